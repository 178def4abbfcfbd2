"""/v1/admin/*: model versions (list, load, activate, split, rollback, unload), behind a bearer token.

`Authorization: Bearer $UDG_ADMIN_TOKEN`, compared in constant time. Without `UDG_ADMIN_TOKEN` the admin API
is disabled (403 `admin_disabled`), never open. Any worker can take a call: the change goes into the routing
document in Redis (service/control.py); every worker follows it, and the call answers once every live worker
has applied it (or after `UDG_ADMIN_WAIT_S`), with `propagation` = {workers, applied, complete, propagation_s}.

    GET  /v1/admin/versions                    versions (state, reason, manifest), routing, workers
    POST /v1/admin/versions/{version}/load     load + verify + warm up in every worker (not serving yet)
    POST /v1/admin/versions/{version}/activate serve it to everyone (loads it first if needed; clears a split)
    POST /v1/admin/split  {"weights": {"v1": 90, "v2": 10}}   A/B split by user-id hash
    POST /v1/admin/rollback                    back to the routing before the last activate/split/rollback
    POST /v1/admin/versions/{version}/unload   release it in every worker (refused while it serves)

Errors: 404 unknown version, 409 a change that contradicts the routing, 422 `version_refused` (load or
verification failed; the reason says which check; serving is unchanged), 503 Redis unavailable.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from repository import is_version_name
from service.api.deps import Services, ServicesDep, json_ok, read_body
from service.api.schemas import AdminChange, AdminVersions, SplitRequest, request_body
from service.control import HISTORY_KEEP, Conflict
from service.errors import HTTP_STATUSES, AdminDisabled, NotFound, Unauthorized, VersionRefusedError, responses
from service.errors import Conflict as ConflictError
from service.registry import VersionRefused

PREFIX = "/v1/admin"


async def require_admin(request: Request, services: ServicesDep) -> Services:
    token = services.settings.admin_token
    if token is None or not token.get_secret_value():
        raise AdminDisabled("the admin API is disabled: set UDG_ADMIN_TOKEN to enable it")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <UDG_ADMIN_TOKEN>)",
                           headers={"WWW-Authenticate": "Bearer"})
    return services


AdminDep = Annotated[Services, Depends(require_admin)]
router = APIRouter(prefix=PREFIX, tags=["admin"])
_AUTH = (*HTTP_STATUSES, 401, 403)
_CHANGE = {200: {"model": AdminChange, "description": "Applied; `propagation` says by how many workers"}}


def _known(services: Services, version: str) -> str:
    repository = services.registry.repository
    if not repository.has(version):
        raise NotFound(f"version {version!r} is not in the model repository {repository.root} "
                       f"(known: {repository.versions()})", field="version")
    return version


async def _load_here(services: Services, versions) -> None:
    for version in versions:
        try:
            await services.registry.ensure_loaded(version)
        except VersionRefused as error:
            raise VersionRefusedError(str(error), field="version",
                                      details=[{"version": error.version, "reason": error.reason}]) from None


async def _change(services: Services, mutate, action: str, check=None) -> dict:
    control = services.control
    try:
        doc = await control.update(mutate, action)
    except Conflict as error:
        raise ConflictError(str(error)) from None
    await control.sync()  # this worker applies it now; the others on the notification
    propagation = await control.wait_applied(doc, services.settings.admin_wait_s, check)
    return {"action": action, "generation": doc["generation"], "active": doc["active"], "split": doc["split"],
            "loaded": doc["loaded"], "propagation": propagation}


def _push_history(doc: dict) -> None:
    doc["history"] = ([{"active": doc["active"], "split": doc.get("split")}] + doc.get("history", []))[:HISTORY_KEEP]


def _add_loaded(doc: dict, *versions: str) -> None:
    doc["loaded"] = list(dict.fromkeys([*doc.get("loaded", []), *versions]))


@router.get("/versions", summary="Model versions: state, manifest metadata; routing; workers",
            responses={200: {"model": AdminVersions, "description": "Versions, routing, workers"},
                       **responses(*_AUTH)})
async def list_all(services: AdminDep):
    control = services.control
    return json_ok({"versions": services.registry.describe(), "routing": await control.read(),
                    "workers": await control.workers(), "this_worker": control.worker_id})


@router.post("/versions/{version}/load", summary="Load, verify and warm up a version in every worker",
             responses={**_CHANGE, **responses(*_AUTH, 404, 409, 422)})
async def load(version: str, services: AdminDep):
    _known(services, version)
    await _load_here(services, [version])
    return await _change(services, lambda doc: _add_loaded(doc, version), f"load {version}",
                         check=lambda w: version in w["ready"] or version in w["failed"])


@router.post("/versions/{version}/activate", summary="Serve this version to every user (clears a split)",
             responses={**_CHANGE, **responses(*_AUTH, 404, 409, 422)})
async def activate(version: str, services: AdminDep):
    _known(services, version)
    await _load_here(services, [version])

    def mutate(doc):
        if doc["active"] != version or doc.get("split"):
            _push_history(doc)
        doc["active"], doc["split"] = version, None
        _add_loaded(doc, version)

    return await _change(services, mutate, f"activate {version}")


@router.post("/split", summary="A/B split by stable user-id hash, e.g. {\"weights\": {\"v1\": 90, \"v2\": 10}}",
             openapi_extra=request_body(SplitRequest), responses={**_CHANGE, **responses(*_AUTH, 404, 409, 413, 422)})
async def split(request: Request, services: AdminDep):
    body = SplitRequest.model_validate_json(await read_body(request, 64 * 1024))
    weights = body.weights
    if abs(sum(weights.values()) - 100.0) > 1e-6:
        raise VersionRefusedError(f"weights: they sum to {sum(weights.values()):g}, expected 100", field="weights")
    for version in weights:
        _known(services, version)
    await _load_here(services, list(weights))

    def mutate(doc):
        _push_history(doc)
        doc["split"] = dict(weights) if len(weights) > 1 else None
        if len(weights) == 1:
            doc["active"] = next(iter(weights))
        _add_loaded(doc, *weights)

    return await _change(services, mutate, "split " + ", ".join(f"{v}={w:g}%" for v, w in weights.items()))


@router.post("/rollback", summary="Back to the routing before the last activate, split or rollback",
             responses={**_CHANGE, **responses(*_AUTH, 409, 422)})
async def rollback(services: AdminDep):
    doc = await services.control.read()
    history = (doc or {}).get("history") or []
    if not history:
        raise ConflictError("nothing to roll back to (no earlier routing in the history)")
    previous = history[0]
    await _load_here(services, [previous["active"], *(previous.get("split") or {})])

    def mutate(doc):
        if not doc.get("history"):
            raise Conflict("nothing to roll back to")
        restored = doc["history"].pop(0)
        doc["active"], doc["split"] = restored["active"], restored.get("split")
        _add_loaded(doc, restored["active"], *(restored.get("split") or {}))

    return await _change(services, mutate, f"rollback to {previous['active']}"
                         + (f" with split {previous['split']}" if previous.get("split") else ""))


@router.post("/versions/{version}/unload", summary="Release a version in every worker (not while it serves)",
             responses={**_CHANGE, **responses(*_AUTH, 404, 409)})
async def unload(version: str, services: AdminDep):
    if not is_version_name(version):
        raise NotFound(f"version {version!r} is not a valid version name", field="version")

    def mutate(doc):
        if doc["active"] == version or version in (doc.get("split") or {}):
            raise Conflict(f"version {version} is serving (active or a split arm); activate another first")
        doc["loaded"] = [v for v in doc.get("loaded", []) if v != version]

    return await _change(services, mutate, f"unload {version}", check=lambda w: version not in w["ready"])
