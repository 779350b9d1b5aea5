#!/usr/bin/env python
"""Writes .cog/openapi_schema.json from predict.py, without the Go `cog` CLI or Docker.

The local Cog server (coglet) validates inputs and allows SSE streaming only through this file
(read from the server's working directory), and cog 0.23's Python SDK ships no generator: the Go
CLI writes it at `cog build`. This script uses the SDK's own introspection (the code coglet uses
to load the predictor) and emits the same OpenAPI 3.0.2 layout as the CLI: components Input,
Output, PredictionRequest/Response, and paths./predictions.post["x-cog-streaming"] when run()
carries @cog.streaming. predict.py is imported (torch too) but setup() is not run.

usage (from anywhere; paths are relative to the repository):
  .venv/bin/python scripts/cog_schema.py            # (re)write .cog/openapi_schema.json
  .venv/bin/python scripts/cog_schema.py --check    # exit 1 if the committed file is stale
  .venv/bin/python scripts/cog_schema.py -o -       # print it
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REF = "predict.py:Predictor"
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


def _title(name: str) -> str:
    return " ".join(part.capitalize() for part in name.split("_") if part)


def _has_streaming_decorator(source: Path, cls: str) -> bool:
    """Whether cls.run()/predict() is decorated with @streaming / @cog.streaming (as the CLI checks)."""
    for node in ast.walk(ast.parse(source.read_text())):
        if not (isinstance(node, ast.ClassDef) and node.name == cls):
            continue
        for fn in node.body:
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name in ("run", "predict"):
                for deco in fn.decorator_list:
                    target = deco.func if isinstance(deco, ast.Call) else deco
                    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                    if name == "streaming":
                        return True
    return False


def _input_property(field, adt) -> tuple[dict, bool]:
    """(OpenAPI property, required?) for one predictor input."""
    ft = field.type
    prop: dict = {"x-order": field.order}
    if field.choices:
        prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
    else:
        prop["title"] = _title(field.name)
        prop.update(ft.json_type())
    nullable = ft.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
    if (ft.primitive is adt.PrimitiveType.SECRET and ft.repetition is adt.Repetition.REQUIRED
            and field.default is None):  # `x: Secret = Input(default=None)`: an optional secret
        nullable = True
    has_default = field.default is not None
    required = not has_default and not nullable
    if has_default:
        prop["default"] = ft.json_encode(field.default)
    if nullable:
        prop["nullable"] = True
    if field.description is not None:
        prop["description"] = field.description
    integer = ft.primitive is adt.PrimitiveType.INTEGER
    for key, value in (("minimum", field.ge), ("maximum", field.le), ("minLength", field.min_length),
                       ("maxLength", field.max_length), ("pattern", field.regex)):
        if value is not None:
            if key in ("minimum", "maximum") and integer and not isinstance(value, int):
                value = int(value) if float(value).is_integer() else value  # 5.0 -> 5, exactly
            prop[key] = value
    if field.deprecated:
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

    properties, required, enums = {}, [], {}
    for name, field in sorted(info.inputs.items(), key=lambda kv: kv[1].order):
        properties[name], is_required = _input_property(field, adt)
        if is_required:
            required.append(name)
        if field.choices:
            enums[name] = {"title": name, "description": "An enumeration.",
                           "enum": list(field.choices),
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
    if _has_streaming_decorator(source, cls):
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
    text = render(args.ref)
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
