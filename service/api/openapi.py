"""The OpenAPI document speaks the active version's schema: `profile` lists that version's profile fields.

The request models accept any field names (a version swap must not need a new process), and the routes
check a profile against the serving version's feature schema (unknown field: 422 naming it). The document
says the same thing up front: every `profile` object in a request body gets the active version's fields as
its properties, with their known values as examples and no others allowed. It is rebuilt when the active
version changes, so `/docs` and `/openapi.json` always show what the service accepts right now.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from service.api.schemas import REQUEST_MODELS

EXAMPLES = 8  # known values shown per field


def field_schema(field) -> dict:
    """A profile field of the feature schema -> its JSON Schema in the request body."""
    tokens = field.vocab.tokens[2:]
    if field.kind == "numeric":
        edges = ", ".join(f"{e:g}" for e in field.buckets or [])
        return {"anyOf": [{"type": "number"}, {"type": "string", "maxLength": 128}],
                "description": f"numeric: bucketed at [{edges}] into {field.labels} (a label itself is accepted "
                               "too); a value with no row of its own is scored as out-of-vocabulary",
                "examples": [field.labels[len(field.labels) // 2]] if field.labels else []}
    return {"anyOf": [{"type": "string", "maxLength": 128}, {"type": "number"}],
            "description": f"{field.kind}: {len(tokens):,d} known values; any other value is scored as "
                           "out-of-vocabulary",
            "examples": tokens[:EXAMPLES]}


def profile_schema(schema, version: str) -> dict:
    return {"type": "object", "additionalProperties": False,
            "properties": {f.name: field_schema(f) for f in schema.user_fields},
            "description": f"The user's profile, for users the serving version has no state for. Fields of "
                           f"version {version}: {', '.join(schema.profile_fields) or '(none)'}; each optional. "
                           "An unknown field is refused with 422 naming it."}


def _patch(node, profile: dict) -> None:
    """Every `profile` property of an object schema -> the version's profile (nullable where it was)."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict) and "profile" in properties:
            properties["profile"] = {"anyOf": [profile, {"type": "null"}], "default": None, "title": "Profile"}
        for key, value in node.items():
            if key != "properties" or not isinstance(value, dict):
                _patch(value, profile)
            else:
                for name, child in value.items():
                    if name != "profile":
                        _patch(child, profile)
    elif isinstance(node, list):
        for child in node:
            _patch(child, profile)


def base_document(app: FastAPI, settings=None) -> dict:
    """FastAPI's document + the request bodies' schemas (validated from the raw body by the routes, so FastAPI
    does not know them) under components/schemas, with this deployment's limits (UDG_MAX_CANDIDATES, ...)."""
    document = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    _, defs = models_json_schema([(model, "validation") for model in REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, answer in list(operation.get("responses", {}).items()):
                media = answer.get("content", {})
                if any(v.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError") for v in media.values()):
                    del operation["responses"][status]  # FastAPI's default 422: never sent (errors.py answers)
                elif any(v.get("schema") == error_ref for v in media.values()):
                    answer["content"] = {"application/json": {"schema": error_ref}}  # errors are JSON everywhere
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if settings is not None:
        schemas["ScoreRequest"]["properties"]["candidates"]["maxItems"] = settings.max_candidates
        schemas["EventBatch"]["properties"]["events"]["maxItems"] = settings.max_events_per_batch
    return document


def install(app: FastAPI, settings=None) -> None:
    """Replace `app.openapi` with one that shows the active version's profile fields."""
    cache: dict = {}

    def openapi() -> dict:
        if "base" not in cache:
            cache["base"] = base_document(app, settings)
        services = getattr(app.state, "services", None)
        model = services.registry.active if services is not None else None
        if model is None or model.artifact is None:
            return cache["base"]
        if cache.get("version") != model.version:
            document = copy.deepcopy(cache["base"])
            _patch(document, profile_schema(model.artifact.schema, model.version))
            document["info"]["description"] = (f"Serving model version {model.version} "
                                               f"({model.artifact.manifest['model']['kind']}).")
            cache.update(version=model.version, document=document)
        return cache["document"]

    app.openapi = openapi
