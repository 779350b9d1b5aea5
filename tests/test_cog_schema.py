"""The committed Cog schema (.cog/openapi_schema.json) is current, and says what predict.py means.

coglet validates inputs and allows SSE streaming only through that file, so a stale one
silently changes the API. Regenerate with: .venv/bin/python scripts/cog_schema.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

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


def test_inputs(schema: dict) -> None:
    inputs = schema["components"]["schemas"]["Input"]
    props = inputs["properties"]
    assert inputs["required"] == ["prompt"]
    assert [name for name, _ in sorted(props.items(), key=lambda kv: kv[1]["x-order"])] == [
        "prompt", "system_prompt", "history", "max_tokens", "temperature", "top_p", "top_k",
        "repetition_penalty", "seed", "stop_sequences"]
    expected = {  # name: (type, default, minimum, maximum)
        "system_prompt": ("string", "", None, None),
        "history": ("string", "", None, None),
        "max_tokens": ("integer", 2048, 1, 32768),
        "temperature": ("number", 0.8, 0, 5),
        "top_p": ("number", 0.8, 0, 1),
        "top_k": ("integer", 0, 0, None),
        "repetition_penalty": ("number", 1.0, 0.01, 10),
        "stop_sequences": ("string", "", None, None),
    }
    for name, (kind, default, lo, hi) in expected.items():
        p = props[name]
        assert (p["type"], p["default"], p.get("minimum"), p.get("maximum")) == (kind, default, lo, hi), name
    seed = props["seed"]
    assert seed["type"] == "integer" and seed["nullable"] is True and "default" not in seed
    assert seed["minimum"] == 0 and seed["maximum"] >= 2**63 - 1
    for name, p in props.items():
        assert p.get("description"), f"{name} has no description"
    assert "[[" in props["history"]["description"] and '"role"' in props["history"]["description"]
    assert "\\," in props["stop_sequences"]["description"]


def test_cog_yaml_matches_predictor() -> None:
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())
    build = cfg["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert build["python_requirements"] == "requirements.txt"
    assert cfg["predict"] == "predict.py:Predictor"
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(rf"^cog=={re.escape(build['sdk_version'])}$", requirements, re.M)
    torch_pin = re.search(r"^torch==(\S+)$", requirements, re.M).group(1)
    assert torch_pin == "2.13.0" and build["cuda"] == "13.0"  # the CUDA the PyPI torch wheel uses

    import predict

    assert cfg["concurrency"]["max"] == predict.CONCURRENCY >= 8
    assert predict.Predictor.run.__cog_concurrent_max__ == predict.CONCURRENCY
