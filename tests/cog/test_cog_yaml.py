"""cog.yaml, the image's requirements and .dockerignore, checked against cog 0.23.1's own rules.

scripts/venv unpacks those rules from the cog source distribution on PyPI (the config schema,
the torch/CUDA matrix, the environment deny list and the deprecations) into .venv/cog-src/.
"""

from __future__ import annotations

import fnmatch
import json
import re
from importlib import metadata

import jsonschema
import pytest
import yaml

from chatglm3 import coglet_cancel

from conftest import ROOT


def pins(path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, op, version = re.match(r"([A-Za-z0-9_.-]+)\s*([=<>!~]=?)\s*(\S+)", line).groups()
            out[name.lower().replace("_", "-")] = op + version
    return out


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


@pytest.fixture(scope="module")
def rules():
    version = pins(ROOT / "requirements.txt")["cog"].removeprefix("==")
    path = ROOT / ".venv" / "cog-src" / version / "pkg" / "config"
    if not (path.parent.parent / ".complete").exists():
        pytest.fail(f"{path} missing: scripts/venv unpacks cog {version}'s build rules there")
    return path


def test_valid_against_cogs_config_schema(cfg, rules) -> None:
    schema = json.loads((rules / "data" / "config_schema_v1.0.json").read_text())
    jsonschema.validate(cfg, schema)  # raises with the offending key


def test_no_deprecated_keys(cfg, rules) -> None:
    source = (rules / "validate.go").read_text()
    body = source[source.index("func checkDeprecatedFields"):]
    body = body[: body.index("\n}\n")]
    deprecated = re.findall(r'Field:\s+"([^"]+)"', body)
    assert {"predict", "concurrency.max"} <= set(deprecated)  # what cog 0.23.1 warns about
    for dotted in deprecated:
        node = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert node is None, f"cog.yaml uses deprecated {dotted}"
    assert "concurrency" not in cfg  # the decorator is the one source
    assert cfg["run"] == "predict.py:Predictor"


def test_environment_is_allowed_and_demands_a_gpu(cfg, rules) -> None:
    deny = re.findall(r'^\s+"([A-Z0-9_*]+)",', (rules / "env.go").read_text(), re.M)
    assert "PATH" in deny and "CUDA_*" in deny
    env = dict(item.split("=", 1) for item in cfg["environment"])
    for name in env:
        assert not any(fnmatch.fnmatchcase(name, pattern) for pattern in deny), name
    assert env["CHATGLM3_DEVICE"] == "cuda"


def test_torch_cuda_pair_is_in_cogs_matrix(cfg, rules) -> None:
    image = pins(ROOT / cfg["build"]["python_requirements"])
    torch = image["torch"].removeprefix("==")
    cuda = cfg["build"]["cuda"]
    assert cuda.startswith("12.")  # host drivers from R525 on; CUDA 13 would need R580+
    matrix = json.loads((rules / "torch_compatibility.json").read_text())
    entry = next((e for e in matrix if e["Torch"] == f"{torch}+cu{cuda.replace('.', '')}"), None)
    assert entry is not None, f"torch {torch} with CUDA {cuda} is not in cog's matrix"
    assert entry["CUDA"] == cuda and cfg["build"]["python_version"] in entry["Pythons"]


def test_image_requirements_equal_the_tested_ones_but_torch(cfg) -> None:
    tested, image = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-image.txt")
    assert tested.pop("cog") == "==" + cfg["build"]["sdk_version"]  # cog/coglet: sdk_version
    assert tested.pop("torch") != image.pop("torch")
    assert image == tested


def test_coglet_is_the_version_the_cancel_relay_was_checked_with(cfg) -> None:
    assert metadata.version("coglet") == coglet_cancel.CHECKED_COGLET
    assert metadata.version("cog") == cfg["build"]["sdk_version"]
    assert coglet_cancel.check_coglet_version() is None
    build = (ROOT / "docs" / "deployment.md").read_text()  # where the build commands are
    assert f"COGLET_WHEEL=pypi:{coglet_cancel.CHECKED_COGLET}" in build  # the build pins it


def test_dockerignore_keeps_local_work_out() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for p in patterns:
            negate, p = p.startswith("!"), p.lstrip("!")
            if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.rstrip("/") + "/*"):
                verdict = not negate
        return verdict

    for path in (".venv/bin/python", "weights/pytorch_model-00001-of-00007.bin", "tests/x.py",
                 "bench/out/x.json", "bench/decode.py", ".device/x.whl", ".whl/x.whl",
                 ".gl/x.deb", ".git/HEAD", ".ci/run", "bench/gpu_run", "docs/webchat.png",
                 "test-artifacts/webchat.png"):
        assert ignored(path), path
    for path in ("predict.py", "chatglm3/engine/engine.py", "cog.yaml", "requirements-image.txt",
                 ".cog/openapi_schema.json", "weights/README.md",
                 "chatglm3/webchat/static/app.js"):
        assert not ignored(path), path
