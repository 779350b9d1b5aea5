"""scripts/install_torch.py: which torch build a machine gets, from its NVIDIA driver (faked
here: a /proc file, an nvidia-smi on PATH, or none), and the pip commands for it. The real CPU
install on this machine is what scripts/venv does on every fresh clone (CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "install_torch.py"
_spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
it = sys.modules["install_torch"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(it)
PIN = it.torch_pin(ROOT / "requirements.txt")


@pytest.mark.parametrize("driver,variant", [
    (None, "cpu"),
    ("580.65.06", "cu130"),
    ("610.10", "cu130"),
    ("579.99", "cu128"),
    ("550.54.15", "cu128"),
    ("525.60.13", "cu128"),
])
def test_build_follows_the_driver(driver, variant) -> None:
    choice = it.choose(driver)
    assert choice.variant == variant
    assert not choice.warning
    if driver:
        assert driver in choice.reason


def test_a_driver_too_old_for_cuda_gets_the_cpu_build_with_a_warning() -> None:
    choice = it.choose("470.82.01")
    assert choice.variant == "cpu"
    assert "older than R525" in choice.warning and "CHATGLM3_TORCH=cu128" in choice.warning


def test_forced_choice_and_a_bad_one() -> None:
    assert it.choose("550.54", "cpu").variant == "cpu"
    assert it.choose(None, " CU126 ").variant == "cu126"
    assert it.choose(None, "keep").variant == "keep"
    with pytest.raises(ValueError, match="CHATGLM3_TORCH: expected one of cpu, cu126, cu128, "
                                         "cu130, keep, got 'rocm'"):
        it.choose(None, "rocm")


def test_driver_read_from_proc(tmp_path: Path, monkeypatch) -> None:
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 "
                    "22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # and no nvidia-smi
    assert it.driver_version(proc) == "550.54.15"
    assert it.driver_version(tmp_path / "absent") is None


def test_driver_read_from_nvidia_smi(tmp_path: Path, monkeypatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 535.104.05\necho 535.104.05\n")  # one line per GPU
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert it.driver_version(tmp_path / "absent") == "535.104.05"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert it.driver_version(tmp_path / "absent") is None


def test_the_cpu_build_needs_no_other_index_first() -> None:
    """CI's machine reaches only its configured package sources: the first try asks them alone
    for the CPU build; PyTorch's CPU index comes only if they do not have it."""
    first, fallback = it.commands(["py", "-m", "pip"], PIN, "cpu")
    assert first[-1] == f"torch=={PIN}+cpu" and "--index-url" not in first
    assert "https://download.pytorch.org/whl/cpu" in fallback
    (cu128,) = it.commands(["py", "-m", "pip"], PIN, "cu128")
    assert f"torch=={PIN}+cu128" in cu128 and "https://download.pytorch.org/whl/cu128" in cu128
    (pypi,) = it.commands(["py", "-m", "pip"], PIN, "cu130")
    assert pypi[-1] == f"torch=={PIN}" and "--index-url" not in pypi


def _run(env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), sys.executable,
                           str(ROOT / "requirements.txt"), *extra],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_this_machine_keeps_its_installed_build() -> None:
    """The test environment's torch is the CPU build of the pin: nothing to do, nothing said."""
    import torch

    assert torch.__version__ == f"{PIN}+cpu"
    out = _run({"CHATGLM3_TORCH": "cpu"})
    assert out.returncode == 0 and out.stderr == ""


def test_dry_run_says_what_it_would_install_and_why() -> None:
    out = _run({"CHATGLM3_TORCH": "cu128"}, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"installing the CUDA 12.8 build of torch {PIN} (CHATGLM3_TORCH=cu128)" in out.stderr
    assert "would run: " in out.stderr and "uninstall -y torch" in out.stderr
    assert f"torch=={PIN}+cu128 --index-url https://download.pytorch.org/whl/cu128" in out.stderr
    bad = _run({"CHATGLM3_TORCH": "cuda"})
    assert bad.returncode == 2 and "CHATGLM3_TORCH: expected one of" in bad.stderr
