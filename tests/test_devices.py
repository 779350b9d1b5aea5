"""Choosing the device: a GPU that is there but that torch cannot use is said out loud."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatglm3 import devices


@pytest.fixture
def no_usable_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_with_an_unusable_nvidia_gpu_warns_with_the_reason(no_usable_cuda, monkeypatch,
                                                                 tmp_path: Path, capsys) -> None:
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(devices, "DEV", tmp_path)
    monkeypatch.setattr(devices, "driver_version", lambda: "550.54.15")
    assert devices.resolve_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.startswith("WARNING: an NVIDIA GPU is present but torch cannot use it")
    # the reason cuda_problem() finds, with what was found
    assert "this torch build has no CUDA support" in err
    assert "NVIDIA driver 550.54.15" in err and "GPUs visible: nvidia0" in err
    assert "--device cpu" in err and "CHATGLM3_DEVICE=cpu" in err


def test_auto_without_a_gpu_is_quiet(no_usable_cuda, monkeypatch, tmp_path: Path,
                                     capsys) -> None:
    monkeypatch.setattr(devices, "DEV", tmp_path)
    monkeypatch.setattr(devices, "driver_version", lambda: None)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_cpu_asked_for_is_quiet_even_with_a_gpu(monkeypatch, tmp_path: Path, capsys) -> None:
    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(devices, "DEV", tmp_path)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().err == ""
