"""A corpus of JSON Schemas for structured-output tests: nested objects, arrays with item
bounds, enums, bounded numbers, strings with patterns, anyOf, optional fields, Chinese keys and
values. Each keeps its strings and arrays bounded, so that even random weights reach the end
within the tests' token budget (an unbounded string may go on for ever: only max_tokens ends
it, as "length")."""

from __future__ import annotations

CORPUS: dict[str, dict] = {
    "flat report": {
        "type": "object", "additionalProperties": False,
        "required": ["revenue", "auditor", "profitable"],
        "properties": {"revenue": {"type": "integer", "minimum": 0, "maximum": 10**9},
                       "auditor": {"enum": ["KPMG", "Deloitte", "EY", "PwC"]},
                       "profitable": {"type": "boolean"}}},
    "nested with arrays": {
        "type": "object", "additionalProperties": False, "required": ["company", "segments"],
        "properties": {
            "company": {"type": "object", "additionalProperties": False,
                        "required": ["name", "year"],
                        "properties": {"name": {"type": "string", "maxLength": 12},
                                       "year": {"type": "integer", "minimum": 1990,
                                                "maximum": 2030}}},
            "segments": {"type": "array", "minItems": 1, "maxItems": 3,
                         "items": {"type": "object", "additionalProperties": False,
                                   "required": ["name", "share"],
                                   "properties": {"name": {"type": "string", "maxLength": 8},
                                                  "share": {"type": "integer", "minimum": 0,
                                                            "maximum": 100}}}}}},
    "patterns and optional fields": {
        "type": "object", "additionalProperties": False, "required": ["date", "ticker"],
        "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                       "ticker": {"type": "string", "pattern": "^[A-Z]{2,4}$"},
                       "note": {"type": "string", "maxLength": 10},
                       "rating": {"type": "integer", "minimum": 1, "maximum": 5}}},
    "anyOf": {
        "type": "object", "additionalProperties": False, "required": ["value"],
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": -50, "maximum": 50},
                                           {"type": "boolean"},
                                           {"enum": ["n/a", "unknown"]}]}}},
    "Chinese keys and values": {
        "type": "object", "additionalProperties": False, "required": ["公司", "审计师", "营收"],
        "properties": {"公司": {"type": "string", "maxLength": 6},
                       "审计师": {"enum": ["普华永道", "德勤", "安永", "毕马威"]},
                       "营收": {"type": "integer", "minimum": 0, "maximum": 100000}}},
    "array at the top": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"enum": ["收入", "利润", "现金流", "负债"]}},
}
