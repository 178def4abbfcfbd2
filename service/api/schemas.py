"""Request bodies, validated by pydantic from the raw JSON (one pass, Rust parser, errors name the field).

Unknown top-level keys are rejected (422 naming the key), so a typo such as `candidate` is not silently
ignored. Per-deployment limits (max candidates, max events per batch) are checked by the routes.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictStr, WithJsonSchema

UserId = Annotated[StrictStr, Field(min_length=1, max_length=256)]
# Stored item ids (events) may not contain control characters: \x1f separates the stored history.
StoredItemId = Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
CandidateId = Annotated[StrictStr, Field(max_length=256)]
VersionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def _number_token(value: Any, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be {what}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number (NaN and infinity are not allowed)")
        return int(value) if value.is_integer() else value
    return value


def _profile_value(value: Any) -> str:
    """A profile value: a string, or a finite number (kept as the string the vocabularies hold: 25 -> '25')."""
    if isinstance(value, str):
        if len(value) > 128:
            raise ValueError("must be at most 128 characters")
        return value
    return str(_number_token(value, "a string or a finite number"))


def _timestamp(value: Any) -> int | float:
    ts = _number_token(value, "a number (seconds or milliseconds since the epoch)")
    if not 0 <= ts <= 1e13:
        raise ValueError("must be between 0 and 1e13")
    return ts


def _top_k(value: Any) -> int:
    """A positive integer; 3.0 is one too (JSON Schema's `integer`)."""
    number = _number_token(value, "an integer")
    if not isinstance(number, int):
        raise ValueError("must be an integer")
    if number < 1:
        raise ValueError("must be at least 1")
    return number


# The JSON Schemas say what the validators accept (the OpenAPI document is the contract).
ProfileValue = Annotated[str, PlainValidator(_profile_value),
                         WithJsonSchema({"anyOf": [{"type": "string", "maxLength": 128}, {"type": "number"}]})]
Profile = Annotated[dict[Annotated[StrictStr, Field(max_length=64)], ProfileValue], Field(max_length=32)]
Timestamp = Annotated[int | float, PlainValidator(_timestamp),
                      WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1e13,
                                      "description": "seconds or milliseconds since the epoch"})]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreRequest(Strict):
    user_id: UserId
    # uniqueItems: a duplicate is a 422 naming it; maxItems (UDG_MAX_CANDIDATES) is set by service/api/openapi.py
    candidates: Annotated[list[CandidateId], Field(min_length=1, json_schema_extra={"uniqueItems": True})]
    profile: Profile | None = None
    top_k: Annotated[int, PlainValidator(_top_k), WithJsonSchema({"type": "integer", "minimum": 1})] | None = None
    model_version: VersionName | None = None  # pin a loaded version (debugging, offline comparison)


class Event(Strict):
    user_id: UserId
    item_id: StoredItemId
    clicked: StrictBool
    ts: Timestamp | None = None
    profile: Profile | None = None
    # Idempotency key (dedups a retry whatever its ts); events without ts nor event_id get one in the answer.
    event_id: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")] | None = None


class EventBatch(Strict):
    events: Annotated[list[Event], Field(min_length=1)]


class SplitRequest(Strict):
    """{version: percent}, in arm order (users hash into consecutive ranges in this order); sums to 100."""

    weights: Annotated[dict[VersionName, Annotated[float, Field(gt=0, le=100)]], Field(min_length=1, max_length=16)]


# --- response bodies (documented in the OpenAPI document; the routes serialize them with orjson) -------------
class Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields may be added; none is removed without a new API version


class ScoreResponse(Open):
    model_version: str = Field(description="the version that scored")
    cold_start: bool = Field(description="the user had no state under this version (profile / meta generator)")
    scores: list[float] = Field(description="click probability per candidate, in request order")
    ranking: list[str] = Field(description="candidate ids by score, best first (top_k of them with top_k)")
    unknown_candidates: list[str] = Field(description="ids the version never saw (scored through the OOV row)")
    warmup_steps: int = Field(0, description="gradient steps the online warm-up took on the user's UDG embedding "
                              "under this version from their events (0: as published or generated)")


class EventsResponse(Open):
    accepted: int
    appended: int = Field(description="clicks stored")
    duplicates: int = Field(description="clicks already stored (same item_id and ts): not counted twice")
    not_clicked: int = Field(description="clicked: false events (not stored)")
    refused: list[int] = Field(default_factory=list, description="positions of events not stored because the "
                               "user's deduplication window is full")
    event_ids: list[str | None] = Field(default_factory=list, description="per event its identity: the client's "
                                        "event_id, else a server-assigned id for an event without ts (retry "
                                        "with it as event_id), else null")


class Liveness(Open):
    status: str


class Readiness(Open):
    status: str = Field(description="ready | not_ready")
    model_version: str | None
    redis: str
    reasons: list[str]
    routing: dict[str, Any]


class AdminChange(Open):
    action: str
    generation: int
    active: str | None
    split: dict[str, float] | None
    loaded: list[str]
    propagation: dict[str, Any]


class AdminVersions(Open):
    versions: list[dict[str, Any]]
    routing: dict[str, Any] | None
    workers: list[dict[str, Any]]
    this_worker: str | None


REQUEST_MODELS = (ScoreRequest, Event, EventBatch, SplitRequest)


def request_body(model: type[BaseModel], media_types: tuple[str, ...] = ("application/json",)) -> dict:
    """`openapi_extra` of a route that validates its raw body with `model` (schema in components/schemas),
    read in each of `media_types`."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {media: {"schema": schema} for media in media_types}}}
