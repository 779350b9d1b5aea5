"""Structured output in OpenAI's and vLLM's request shapes -> `params.Structured`.

- OpenAI: `response_format` `{"type": "text"}` (nothing), `{"type": "json_object"}` (any JSON
  object), `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
- vLLM: `structured_outputs` with one of `json` (a schema, as an object or its text), `regex`,
  `choice` (a list of strings), `json_object` (true); and its older top-level `guided_json`,
  `guided_regex`, `guided_choice`.
One way per request. Returns the constraint and the field it came from (errors name it).
"""

from __future__ import annotations

import json
from typing import Any

from ..params import Structured
from .errors import _describe, bad

ANY_OBJECT = '{"type": "object"}'
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}


def parse_structured(body: dict) -> tuple[Structured | None, str]:
    found = [(name, body[name]) for name in ("response_format", "structured_outputs",
                                             *_GUIDED) if body.get(name) is not None]
    found = [(n, v) for n, v in found
             if not (n == "response_format" and isinstance(v, dict) and v.get("type") == "text")]
    if not found:
        return None, "response_format"
    if len(found) > 1:
        raise bad(f"{found[1][0]}: one way of structuring the answer per request; "
                  f"{found[0][0]} is set too", found[1][0])
    name, value = found[0]
    if name == "response_format":
        return _response_format(value), name
    if name == "structured_outputs":
        return _structured_outputs(value), name
    return _one(name, _GUIDED[name], value), name


def _response_format(fmt: Any) -> Structured:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return Structured("json", ANY_OBJECT)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format.json_schema: expected an object with name and schema, "
                      f"got {_describe(spec)}", "response_format")
        schema = spec.get("schema", {})
        if spec.get("strict") is True and isinstance(schema, dict):
            schema = _strict(schema)
        return _one("response_format", "json", schema)
    raise bad('response_format: type must be "text", "json_object" or "json_schema", got '
              f"{_describe(kind if isinstance(fmt, dict) else fmt)}", "response_format")


def _structured_outputs(value: Any) -> Structured:
    name = "structured_outputs"
    if not isinstance(value, dict):
        raise bad(f"{name}: expected an object, got {_describe(value)}", name)
    keys = [k for k in ("json", "regex", "choice", "json_object") if value.get(k) not in
            (None, False)]
    others = [k for k, v in value.items() if v is not None and k not in
              ("json", "regex", "choice", "json_object", "disable_fallback",
               "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")]
    if others:
        raise bad(f"{name}.{others[0]}: not supported (json, regex, choice, json_object are)",
                  name)
    if len(keys) != 1:
        raise bad(f"{name}: exactly one of json, regex, choice, json_object, got "
                  f"{', '.join(keys) or 'none'}", name)
    if keys[0] == "json_object":
        return Structured("json", ANY_OBJECT)
    return _one(name, keys[0], value[keys[0]])


def _one(name: str, kind: str, value: Any) -> Structured:
    if kind == "json":
        if isinstance(value, str):
            return Structured("json", value)
        if not isinstance(value, (dict, bool)):
            raise bad(f"{name}: the JSON Schema must be an object, got {_describe(value)}",
                      name)
        return Structured("json", json.dumps(value, ensure_ascii=False))
    if kind == "regex":
        if not isinstance(value, str):
            raise bad(f"{name}: the regex must be a string, got {_describe(value)}", name)
        return Structured("regex", value)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise bad(f"{name}: choice must be a list of strings, got {_describe(value)}", name)
    return Structured("choice", choices=tuple(value))


def _strict(schema: Any) -> Any:
    """OpenAI's strict mode: an object schema that does not say otherwise takes no properties
    beyond its own (additionalProperties false), at every depth. (The openai SDK's parse()
    sends schemas written so already.)"""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
