"""POST /v1/events and /v1/events/batch: clicks into the user's history, seen by the very next score.

A click is answered 200 only once Redis has stored it; if it could not be stored the answer is 503 (retry
it: a retry never counts twice). Exactly once: an event is identified by its `event_id` if the client sent
one, else by (item_id, ts) if it carries `ts`, else the server assigns it an event id, returned in the answer
(`event_ids`, one per event in request order): a retry that sends it back as `event_id` is deduplicated.
Identities are remembered for `UDG_DEDUP_WINDOW_S` (7 days) after their first delivery whatever their ts, at
most `UDG_DEDUP_CAP` per user; past the cap a new event is refused (not stored: 429 `dedup_window_full` for
one event, `refused` positions in a batch's answer) rather than an older identity forgotten. `clicked: false`
events are accepted and not stored (the behavior feature is made of clicks only). An unknown user gets a
state: their history key (and profile, if the event carries one); their embeddings are made on their first
score request. Within a batch each user's clicks are ordered by `ts` (events without `ts` after, in arrival
order) before being appended, most recent first. A profile is checked against the serving versions' profile
fields (the active one and any split arm): a field none of them has is a 422 naming it, before anything is
stored.
"""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Request

from service import metrics
from service.api.deps import Services, ServicesDep, json_ok, read_body
from service.api.schemas import Event, EventBatch, EventsResponse, request_body
from service.errors import HTTP_STATUSES, ApiError, InvalidField, responses
from service.redis_layout import APPENDED, DUPLICATE, REFUSED, Click

router = APIRouter()


class DedupWindowFull(ApiError):
    status, kind = 429, "dedup_window_full"


def new_event_id() -> str:
    """A server-assigned event id: arrival time (ms, hex) + 64 random bits; unique without coordination."""
    return f"s{time.time_ns() // 1_000_000:x}-{os.urandom(8).hex()}"


def check_profiles(services: Services, events: list[Event], prefix: str) -> None:
    """422 for a profile field that no serving version declares (profiles are kept across versions)."""
    routing = services.registry.routing
    models = [m for m in (routing.active, *(model for _, model in routing.arms)) if m is not None and m.artifact]
    if not models:
        return
    fields = {name for m in models for name in m.artifact.schema.profile_fields}
    for position, event in enumerate(events):
        for key in event.profile or {}:
            if key not in fields:
                where = f"{prefix.format(position)}profile.{key}"
                raise InvalidField(f"{where}: unknown profile field; the serving version(s) "
                                   f"{sorted(m.version for m in models)} have the fields {sorted(fields)}",
                                   field=where)


async def store_events(services: Services, events: list[Event]) -> dict:
    per_user: dict[str, tuple[list[tuple[int, Click]], dict | None]] = {}
    event_ids: list[str | None] = []
    ignored = 0
    for position, event in enumerate(events):
        event_id = event.event_id
        if event_id is None and event.ts is None:
            event_id = new_event_id()
        event_ids.append(event_id)
        clicks, profile = per_user.get(event.user_id, ([], None))
        if event.clicked:
            clicks.append((position, Click(event.item_id, event.ts, event_id)))
        else:
            ignored += 1
        per_user[event.user_id] = (clicks, event.profile or profile)
    batches, positions = {}, {}
    for user_id, (clicks, profile) in per_user.items():
        if not clicks and not profile:
            continue
        clicks.sort(key=lambda pc: (pc[1].ts is None, pc[1].ts or 0, pc[0]))
        batches[user_id] = ([c for _, c in clicks], profile)
        positions[user_id] = [p for p, _ in clicks]
    flags = await services.store.append_clicks(batches) if batches else {}
    counts = {APPENDED: 0, DUPLICATE: 0, REFUSED: 0}
    refused = []
    for user_id, user_flags in flags.items():
        for position, flag in zip(positions[user_id], user_flags, strict=True):
            counts[flag] += 1
            if flag == REFUSED:
                refused.append(position)
    metrics.EVENTS.labels("appended").inc(counts[APPENDED])
    metrics.EVENTS.labels("duplicate").inc(counts[DUPLICATE])
    metrics.EVENTS.labels("refused").inc(counts[REFUSED])
    metrics.EVENTS.labels("not_clicked").inc(ignored)
    metrics.count_arm_events(services.registry.routing.select, events)
    return {"accepted": len(events), "appended": counts[APPENDED], "duplicates": counts[DUPLICATE],
            "not_clicked": ignored, "refused": sorted(refused), "event_ids": event_ids}


_RESPONSES = {200: {"model": EventsResponse, "description": "Stored (clicks) or counted (not clicked)"},
              **responses(*HTTP_STATUSES, 413, 422, 429)}


@router.post("/v1/events", summary="Record one event", openapi_extra=request_body(Event), responses=_RESPONSES)
async def event(request: Request, services: ServicesDep):
    started = time.perf_counter()
    payload = Event.model_validate_json(await read_body(request, services.settings.max_body_bytes))
    check_profiles(services, [payload], "")
    result = await store_events(services, [payload])
    if result["refused"]:
        raise DedupWindowFull(f"user {payload.user_id!r} already has {services.settings.dedup_cap} event "
                              f"identities within the deduplication window ({services.settings.dedup_window_s:.0f} "
                              "s); the event was not stored", field="user_id")
    metrics.REQUEST_SECONDS.labels("/v1/events", "").observe(time.perf_counter() - started)
    return json_ok(result)


@router.post("/v1/events/batch", summary="Record a batch of events", openapi_extra=request_body(EventBatch),
             responses=_RESPONSES)
async def event_batch(request: Request, services: ServicesDep):
    started = time.perf_counter()
    payload = EventBatch.model_validate_json(await read_body(request, services.settings.max_body_bytes))
    limit = services.settings.max_events_per_batch
    if len(payload.events) > limit:
        raise InvalidField(f"events: {len(payload.events)} events, at most {limit} per batch", field="events")
    check_profiles(services, payload.events, "events.{}.")
    result = await store_events(services, payload.events)
    metrics.REQUEST_SECONDS.labels("/v1/events/batch", "").observe(time.perf_counter() - started)
    return json_ok(result)
