"""POST /v1/events and /v1/events/batch: clicks into the user's history, seen by the very next score.

A click is answered 200 only once Redis has stored it; if it could not be stored the answer is 503 (retry
it: events carrying `ts` are deduplicated by (item_id, ts), so a retry never counts twice). `clicked: false`
events are accepted and not stored (the behavior feature is made of clicks only). An unknown user gets a
state: their history key (and profile, if the event carries one); their embeddings are made on their first
score request. Within a batch each user's clicks are ordered by `ts` (events without `ts` after, in arrival
order) before being appended, most recent first. A profile is checked against the serving versions' profile
fields (the active one and any split arm): a field none of them has is a 422 naming it, before anything is
stored.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service import metrics
from service.api.deps import Services, ServicesDep, json_ok, read_body
from service.api.schemas import Event, EventBatch, EventsResponse, request_body
from service.errors import HTTP_STATUSES, InvalidField, responses
from service.redis_layout import Click

router = APIRouter()


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
    ignored = 0
    for position, event in enumerate(events):
        clicks, profile = per_user.get(event.user_id, ([], None))
        if event.clicked:
            clicks.append((position, Click(event.item_id, event.ts)))
        else:
            ignored += 1
        per_user[event.user_id] = (clicks, event.profile or profile)
    batches = {}
    for user_id, (clicks, profile) in per_user.items():
        if not clicks and not profile:
            continue
        clicks.sort(key=lambda pc: (pc[1].ts is None, pc[1].ts or 0, pc[0]))
        batches[user_id] = ([c for _, c in clicks], profile)
    flags = await services.store.append_clicks(batches) if batches else {}
    appended = sum(sum(f) for f in flags.values())
    duplicates = sum(len(f) - sum(f) for f in flags.values())
    metrics.EVENTS.labels("appended").inc(appended)
    metrics.EVENTS.labels("duplicate").inc(duplicates)
    metrics.EVENTS.labels("not_clicked").inc(ignored)
    return {"accepted": len(events), "appended": appended, "duplicates": duplicates, "not_clicked": ignored}


_RESPONSES = {200: {"model": EventsResponse, "description": "Stored (clicks) or counted (not clicked)"},
              **responses(*HTTP_STATUSES, 413, 422)}


@router.post("/v1/events", summary="Record one event", openapi_extra=request_body(Event), responses=_RESPONSES)
async def event(request: Request, services: ServicesDep):
    started = time.perf_counter()
    payload = Event.model_validate_json(await read_body(request, services.settings.max_body_bytes))
    check_profiles(services, [payload], "")
    result = await store_events(services, [payload])
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
