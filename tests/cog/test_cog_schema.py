"""The committed Cog schema (.cog/openapi_schema.json) is current, and says what predict.py means.

coglet validates inputs and allows SSE streaming only through that file, so a stale one
silently changes the API. Regenerate with: .venv/bin/python scripts/cog_schema.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # a subprocess

SCHEMA_FILE = ROOT / ".cog" / "openapi_schema.json"


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("cog_schema", ROOT / "scripts" / "cog_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def test_committed_schema_is_current(generator) -> None:
    fresh = generator.render()
    assert SCHEMA_FILE.read_text() == fresh, (
        ".cog/openapi_schema.json is stale: run .venv/bin/python scripts/cog_schema.py")


def test_check_mode_fails_on_a_stale_file(tmp_path) -> None:
    stale = tmp_path / "openapi_schema.json"
    stale.write_text(SCHEMA_FILE.read_text().replace('"maximum": 32768', '"maximum": 4096'))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "cog_schema.py"), "--check",
                          "-o", str(stale)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "stale" in run.stderr and "4096" in run.stderr
    stale.write_text(SCHEMA_FILE.read_text())
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "cog_schema.py"), "--check",
                          "-o", str(stale)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_streaming_and_output(schema: dict) -> None:
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert schema["components"]["schemas"]["Output"] == {
        "title": "Output", "type": "array", "items": {"type": "string"},
        "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate",
    }


def test_generator_refuses_what_cog_build_would_read_differently(tmp_path) -> None:
    broken = tmp_path / "predict.py"
    broken.write_text((ROOT / "predict.py").read_text().replace("le=32768", "le=CONTEXT")
                      .replace("\nclass Predictor", "\nCONTEXT = 32768\n\nclass Predictor", 1))
    out = tmp_path / "schema.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "cog_schema.py"),
                          f"{broken}:Predictor", "-o", str(out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1, run.stderr
    assert "max_tokens: le= is 32768 in Python, but cog build reads nothing" in run.stderr
    assert not out.exists()
