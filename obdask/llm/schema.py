"""JSON Schema for structured model output.

* :func:`example_instance` builds a small valid instance of a schema (used by
  the test server to answer ``format=<schema>`` requests);
* :func:`validate` checks an instance against a schema with ``jsonschema`` and
  returns a list of problems, one line each.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _resolve(schema: Any, root: dict) -> dict:
    """Follow local ``$ref`` pointers (``#/$defs/X``) until a plain schema is reached."""
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 32:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        node: Any = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part, {}) if isinstance(node, dict) else {}
        schema = node
        seen += 1
    return schema if isinstance(schema, dict) else {}


def _first_type(schema: dict) -> str:
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        return non_null[0] if non_null else "null"
    if isinstance(t, str):
        return t
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def example_instance(schema: Any, root: dict | None = None, _depth: int = 0) -> Any:
    """Return a small instance that is valid for ``schema``.

    Parameters
    ----------
    schema : dict
        A JSON Schema (``bool`` ``True`` and ``{}`` accept anything).
    root : dict, optional
        Document against which ``$ref`` pointers are resolved; defaults to ``schema``.

    Returns
    -------
    object
        JSON-serialisable value: every listed property is filled, arrays get
        ``max(minItems, 1)`` items, strings respect ``minLength``/``maxLength``
        and numbers ``minimum``/``maximum``.
    """
    root = root if root is not None else (schema if isinstance(schema, dict) else {})
    schema = _resolve(schema, root)
    if _depth > 16:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            options = [_resolve(s, root) for s in schema[key]]
            usable = [s for s in options if s.get("type") != "null"] or options
            return example_instance(usable[0], root, _depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {"properties": {}, "required": []}
        for sub in schema["allOf"]:
            sub = _resolve(sub, root)
            merged.update({k: v for k, v in sub.items() if k not in ("properties", "required")})
            merged["properties"].update(sub.get("properties", {}))
            merged["required"] += list(sub.get("required", []))
        return example_instance(merged, root, _depth + 1)
    return _example_of_type(schema, _first_type(schema), root, _depth)


def _example_of_type(schema: dict, kind: str, root: dict, depth: int) -> Any:
    if kind == "object":
        props = schema.get("properties") or {}
        out = {k: example_instance(v, root, depth + 1) for k, v in props.items()}
        for k in schema.get("required") or []:
            out.setdefault(k, "")
        return out
    if kind == "array":
        n = int(schema.get("minItems", 1))
        if "maxItems" in schema:
            n = min(n, int(schema["maxItems"]))
        items = schema.get("items", {})
        if isinstance(items, list):  # draft-04 tuple form
            return [example_instance(s, root, depth + 1) for s in items]
        return [example_instance(items, root, depth + 1) for _ in range(n)]
    if kind in ("integer", "number"):
        value: float = 0
        if "minimum" in schema:
            value = schema["minimum"]
        elif "exclusiveMinimum" in schema and not isinstance(schema["exclusiveMinimum"], bool):
            value = schema["exclusiveMinimum"] + 1
        elif "maximum" in schema and schema["maximum"] < 0:
            value = schema["maximum"]
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _example_string(schema)


def _example_string(schema: dict) -> str:
    fmt = schema.get("format")
    if fmt == "date-time":
        return "2025-01-01T00:00:00Z"
    if fmt == "date":
        return "2025-01-01"
    text = "text"
    lo = int(schema.get("minLength", 0))
    if len(text) < lo:
        text = text + "x" * (lo - len(text))
    if "maxLength" in schema:
        text = text[: int(schema["maxLength"])]
    return text


def validate(instance: Any, schema: Any) -> list[str]:
    """Check ``instance`` against ``schema`` with ``jsonschema``.

    Parameters
    ----------
    instance : object
        Parsed JSON value.
    schema : dict
        JSON Schema (its ``$schema`` picks the draft; the newest by default).

    Returns
    -------
    list of str
        One line per problem (``"$.age: True is not of type 'integer'"``); empty if valid.
    """
    import jsonschema  # a base dependency; imported when a reply is checked

    cls = jsonschema.validators.validator_for(schema)
    return [f"$.{'.'.join(str(p) for p in e.absolute_path)}".rstrip(".") + f": {e.message}"
            for e in cls(schema).iter_errors(instance)]
