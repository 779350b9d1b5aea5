"""The image's configuration on a machine without a usable GPU: setup() fails at once, naming what
it found, and never falls back to running the model on the CPU.

The server runs with exactly the environment cog.yaml bakes into the image, on this CPU-only
machine (torch here is a CPU build: the same failure a host without a working NVIDIA driver
gives). The weights point nowhere: the device check must come before any download.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers.cogserver import running_server
from conftest import ROOT

pytestmark = pytest.mark.slow  # a Cog server


def test_setup_fails_within_seconds_naming_the_gpu_problem(tmp_path) -> None:
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())
    image_env = dict(item.split("=", 1) for item in cfg["environment"])
    assert not torch.cuda.is_available()
    with running_server(tmp_path / "server.log", startup_s=60, **image_env,
                        COG_WEIGHTS=str(tmp_path / "never-fetched")) as srv:
        assert srv.health.get("status") == "SETUP_FAILED", (srv.health, srv.log_tail())
        assert srv.ready_after < 30  # the server's own start included (imports torch)
        logs = srv.health["setup"]["logs"] + srv.log_path.read_text()
    assert "device: cuda was asked for, but no CUDA GPU is usable" in logs
    assert f"torch {torch.__version__}" in logs and "NVIDIA driver" in logs
    assert "CUDA" in logs and "GPUs visible" in logs
    assert "never-fetched" not in logs  # the device check comes before the weights
    assert "ready:" not in logs


def test_serve_in_the_image_runs_from_its_layout_and_keeps_its_device_check(tmp_path) -> None:
    """`docker run IMAGE python -m chatglm3 serve --host 0.0.0.0`: the image holds the code at
    its working directory (cog's /src) without tests/ and scripts/; the server's package is in
    it, its pins are in the image's requirements, and cog.yaml's CHATGLM3_DEVICE=cuda reaches
    it: on a host without a usable GPU it stops at once, before fetching any weights."""
    import subprocess
    import sys

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(p.strip("/").split("/")[0] == "chatglm3" for p in ignored)
    image_reqs = (ROOT / "requirements-image.txt").read_text()
    assert "starlette==" in image_reqs and "uvicorn==" in image_reqs
    cfg = yaml.safe_load((ROOT / "cog.yaml").read_text())
    image_env = dict(item.split("=", 1) for item in cfg["environment"])
    out = subprocess.run([sys.executable, "-m", "chatglm3", "serve", "--host", "0.0.0.0",
                          "--port", "0", "--api-key", "k",
                          "--weights", str(tmp_path / "never-fetched")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", **image_env})
    assert out.returncode == 1, out.stderr
    assert "device: cuda was asked for, but no CUDA GPU is usable" in out.stderr
    assert "never-fetched" not in out.stderr and "Traceback" not in out.stderr
