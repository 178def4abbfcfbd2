"""Request bodies, validated by pydantic from the raw JSON (one pass, Rust parser, errors name the field).

Unknown top-level keys are rejected (422 naming the key), so a typo such as `candidate` is not silently
ignored. Per-deployment limits (max candidates, max events per batch) are checked by the routes.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, StrictStr

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


ProfileValue = Annotated[str, PlainValidator(_profile_value)]
Profile = Annotated[dict[Annotated[StrictStr, Field(max_length=64)], ProfileValue], Field(max_length=32)]
Timestamp = Annotated[int | float, PlainValidator(_timestamp)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreRequest(Strict):
    user_id: UserId
    candidates: Annotated[list[CandidateId], Field(min_length=1)]
    profile: Profile | None = None
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
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
