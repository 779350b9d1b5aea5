#!/usr/bin/env python
"""Writes .cog/openapi_schema.json from predict.py, without the Go `cog` CLI or Docker.

The local Cog server (coglet) validates inputs and allows SSE streaming only through this file
(read from the server's working directory); in the image, `cog build` writes it with its static
parser (scripts/cog_static.py restates its rules). This script reads predict.py both ways: the
values as cog build's parser sees them (cog_static) and the types through the SDK's own
introspection (the code coglet uses to load the predictor; predict.py is imported, setup() is
not run). It refuses to write anything while the two disagree (a name in le=, an imported
default, an escape in a description...), so the committed file is the one the image serves. It
emits the CLI's OpenAPI 3.0.2 layout (pkg/schema/openapi_spec.go): components Input, Output,
PredictionRequest/Response, and paths./predictions.post["x-cog-streaming"] for @cog.streaming.

usage (from anywhere; paths are relative to the repository):
  .venv/bin/python scripts/cog_schema.py            # (re)write .cog/openapi_schema.json
  .venv/bin/python scripts/cog_schema.py --check    # exit 1 if the committed file is stale
  .venv/bin/python scripts/cog_schema.py -o -       # print it
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cog_static  # noqa: E402 - beside this script
DEFAULT_REF = "predict.py:Predictor"
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


def _title(name: str) -> str:
    return " ".join(part.capitalize() for part in name.split("_") if part)


class StaticMismatch(ValueError):
    """predict.py says something cog build's parser would read differently."""


def _go_number(value: float | int) -> float | int:
    """A float64 as Go's encoding/json prints it: integral values without a fraction."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _input_property(static: cog_static.StaticInput, field, adt) -> tuple[dict, bool]:
    """(OpenAPI property, required?) for one input, by the rules of buildInputSchema."""
    ft, kw = field.type, static.keywords
    prop: dict = {"x-order": static.order}
    if kw.get("choices"):
        prop["allOf"] = [{"$ref": f"#/components/schemas/{static.name}"}]
    else:
        prop["title"] = _title(static.name)
        prop.update(ft.json_type())
    nullable = ft.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
    has_default = "default" in kw
    if ft.primitive is adt.PrimitiveType.SECRET and has_default and kw["default"] is None:
        nullable = True  # `x: Secret = Input(default=None)`: an optional secret
    if has_default and kw["default"] is None and not nullable:
        has_default = False  # "no default; made at run time" (e.g. a seed)
    required = not has_default and ft.repetition in (adt.Repetition.REQUIRED,
                                                     adt.Repetition.REPEATED)
    if has_default:
        default = kw["default"]
        prop["default"] = _go_number(default) if isinstance(default, float) else default
    if nullable:
        prop["nullable"] = True
    for key, out in (("description", "description"), ("ge", "minimum"), ("le", "maximum"),
                     ("min_length", "minLength"), ("max_length", "maxLength"),
                     ("regex", "pattern"), ("accept", "x-cog-accept")):
        if key in kw:
            value = kw[key]
            prop[out] = int(value) if key.endswith("length") else (
                _go_number(value) if isinstance(value, float) else value)
    if kw.get("deprecated"):
        prop["deprecated"] = True
    return prop, required


def build_schema(ref: str = DEFAULT_REF) -> dict:
    from cog import _adt as adt
    from cog._inspector import create_predictor

    file_name, cls = ref.split(":", 1)
    source = (ROOT / file_name).resolve()  # relative to the repository (an absolute path stays)
    if str(source.parent) not in sys.path:
        sys.path.insert(0, str(source.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = create_predictor(source.stem, cls)

    problems = cog_static.problems(source, cls)
    if problems:
        raise StaticMismatch("cog build would read predict.py differently:\n  "
                             + "\n  ".join(problems))
    static = cog_static.read_predictor(source, cls)
    if [item.name for item in static.inputs] != list(info.inputs):
        raise StaticMismatch(f"inputs differ: {[i.name for i in static.inputs]} (static) vs "
                             f"{list(info.inputs)} (imported)")

    properties, required, enums = {}, [], {}
    for item in static.inputs:
        field = info.inputs[item.name]
        properties[item.name], is_required = _input_property(item, field, adt)
        if is_required:
            required.append(item.name)
        if item.keywords.get("choices"):
            enums[item.name] = {"title": item.name, "description": "An enumeration.",
                                "enum": list(item.keywords["choices"]),
                                "type": field.type.primitive.json_type().get("type", "string")}
    input_schema: dict = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required

    def ref_to(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    ok = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
    invalid = {"description": "Validation Error",
               "content": {"application/json": {"schema": ref_to("HTTPValidationError")}}}
    predict_op: dict = {
        "summary": "Predict",
        "description": "Run a single prediction on the model",
        "operationId": "predict_predictions_post",
        "requestBody": {"content": {"application/json": {"schema": ref_to("PredictionRequest")}}},
        "responses": {
            "200": {"description": "Successful Response",
                    "content": {"application/json": {"schema": ref_to("PredictionResponse")}}},
            "422": invalid,
        },
    }
    if static.streaming:
        predict_op["x-cog-streaming"] = True

    def string(title: str, **extra) -> dict:
        return {"title": title, "type": "string", **extra}

    schemas = {
        "Input": input_schema,
        "Output": info.output.json_type(),
        **enums,
        "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
            "id": string("Id"), "input": ref_to("Input")}},
        "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
            "input": ref_to("Input"), "output": ref_to("Output"), "id": string("Id"),
            "version": string("Version"),
            "created_at": string("Created At", format="date-time"),
            "started_at": string("Started At", format="date-time"),
            "completed_at": string("Completed At", format="date-time"),
            "status": string("Status"), "error": string("Error"), "logs": string("Logs"),
            "metrics": {"title": "Metrics", "type": "object"}}},
        "Status": {"title": "Status", "description": "An enumeration.", "type": "string",
                   "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
        "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
            "detail": {"title": "Detail", "type": "array", "items": ref_to("ValidationError")}}},
        "ValidationError": {
            "title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object",
            "properties": {
                "loc": {"title": "Location", "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": string("Message"), "type": string("Error Type")}},
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok}}},
        "/health-check": {"get": {"summary": "Healthcheck",
                                  "operationId": "healthcheck_health_check_get",
                                  "responses": {"200": ok}}},
        "/predictions": {"post": predict_op},
        "/predictions/{prediction_id}/cancel": {"post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [{"required": True, "schema": {"title": "Prediction ID", "type": "string"},
                            "name": "prediction_id", "in": "path"}],
            "responses": {"200": ok, "422": invalid}}},
    }
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"},
            "paths": paths, "components": {"schemas": schemas}}


def render(ref: str = DEFAULT_REF) -> str:
    return json.dumps(build_schema(ref), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", nargs="?", default=DEFAULT_REF, help="file.py:Class (default %(default)s)")
    ap.add_argument("-o", "--output", default=str(SCHEMA_PATH), help="file to write, or - for stdout")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the output file differs from a fresh schema")
    args = ap.parse_args(argv)
    try:
        text = render(args.ref)
    except StaticMismatch as e:
        print(e, file=sys.stderr)
        return 1
    out = Path(args.output)
    if args.check:
        old = out.read_text() if out.is_file() else ""
        if old == text:
            print(f"{out}: up to date", file=sys.stderr)
            return 0
        diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(out), "fresh", lineterm="")
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        print(f"{out} is stale: run .venv/bin/python scripts/cog_schema.py", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
