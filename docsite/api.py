"""docs/api.md from the service's OpenAPI document: every operation with its request body, its answers and
the schemas they use. The document is the source; this page is its offline, readable copy."""

from __future__ import annotations

CONSTRAINTS = ("minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "minItems", "maxItems",
               "maxProperties", "uniqueItems", "pattern")


def type_of(schema: dict) -> str:
    """A JSON Schema as a short type expression: `string`, `array of string`, `Event`, `integer | null`."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{name.lower()})"
    if "anyOf" in schema:
        return " \\| ".join(type_of(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_of(schema['additionalProperties'])}"
    return f"`{kind}`"


def constraints_of(schema: dict) -> str:
    found = []
    for option in ("anyOf",):
        for sub in schema.get(option, []):
            found += [c for c in [constraints_of(sub)] if c]
    found += [f"{c} {schema[c]}" for c in CONSTRAINTS if c in schema]
    if "default" in schema and schema["default"] is not None:
        found.append(f"default {schema['default']}")
    return "; ".join(found)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def schema_table(schema: dict) -> list[str]:
    properties = schema.get("properties", {})
    if not properties:
        return [f"Type: {type_of(schema)}.", ""]
    required = set(schema.get("required", []))
    lines = ["| field | type | required | constraints | description |", "|---|---|---|---|---|"]
    for name, prop in properties.items():
        lines.append(f"| `{name}` | {type_of(prop)} | {'yes' if name in required else ''} | "
                     f"{_cell(constraints_of(prop))} | {_cell(prop.get('description', ''))} |")
    return lines + [""]


def render_openapi(document: dict) -> str:
    lines = ["# HTTP API", "",
             "Generated from the service's OpenAPI document by `udg docs build` (do not edit by hand). A running",
             "service serves the same document at `/openapi.json` and an interactive page at `/docs`, where the",
             "`profile` objects list the serving version's profile fields; [serving.md](serving.md) explains the",
             "behaviour behind each route.", "",
             f"{document['info']['title']}, API version {document['info']['version']}.", "",
             "| method | path | summary |", "|---|---|---|"]
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    for path, method, op in operations:
        anchor = _anchor(method, path)
        lines.append(f"| {method.upper()} | [`{path}`](#{anchor}) | {_cell(op.get('summary', ''))} |")
    lines.append("")
    for path, method, op in operations:
        lines += [f"## {method.upper()} {path}", "", op.get("summary", ""), ""]
        if op.get("description"):
            lines += [op["description"].strip(), ""]
        parameters = op.get("parameters", [])
        if parameters:
            lines += ["| parameter | in | type | required |", "|---|---|---|---|"]
            lines += [f"| `{p['name']}` | {p['in']} | {type_of(p.get('schema', {}))} | "
                      f"{'yes' if p.get('required') else ''} |" for p in parameters]
            lines.append("")
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if body:
            lines += [f"Request body: {type_of(body)}.", ""]
        lines += ["| status | body | meaning |", "|---|---|---|"]
        for status, answer in sorted(op["responses"].items()):
            schema = next(iter(answer.get("content", {}).values()), {}).get("schema")
            lines.append(f"| {status} | {type_of(schema) if schema else ''} | {_cell(answer.get('description', ''))} |")
        lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in sorted(document.get("components", {}).get("schemas", {}).items()):
        lines += [f"### {name}", ""]
        if schema.get("description"):
            lines += [" ".join(schema["description"].split()), ""]
        lines += schema_table(schema)
    return "\n".join(lines).rstrip() + "\n"


def _anchor(method: str, path: str) -> str:
    """The heading anchor of `## METHOD PATH`, as GitHub and the docs site's toc slugify it."""
    from docsite.check import slug

    return slug(f"{method.upper()} {path}")
