"""Choosing the device and dtype, and saying exactly why a GPU that was asked for is unusable."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from .errors import SetupError
from .settings import DEVICES


class DeviceError(SetupError):
    """The device asked for cannot be used; the message names what was found."""


def cuda_problem() -> str | None:
    """None when a CUDA GPU is usable; otherwise what is wrong, with the versions found."""
    if torch.version.cuda is None:
        reason = "this torch build has no CUDA support (a CPU-only wheel)"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = torch.cuda.is_available()
        if usable:
            return None
        # torch says why only as a warning ("driver too old", "no NVIDIA driver", ...)
        said = "; ".join(str(w.message).strip() for w in caught)
        reason = said or "torch.cuda.is_available() is False"
    return (f"{reason}. Found: torch {torch.__version__} built for CUDA "
            f"{torch.version.cuda or 'none'}, NVIDIA driver {driver_version() or 'not found'}, "
            f"GPUs visible: {visible_gpus()}")


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, from /proc or nvidia-smi."""
    proc = Path("/proc/driver/nvidia/version")
    try:
        text = proc.read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            first = out.stdout.strip().splitlines()
            return first[0].strip() if out.returncode == 0 and first else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


DEV = Path("/dev")  # where the NVIDIA driver's device nodes appear (a parameter for tests)


def gpu_nodes() -> list[str]:
    return sorted(p.name for p in DEV.glob("nvidia[0-9]*"))


def visible_gpus() -> str:
    devices = gpu_nodes()
    return ", ".join(devices) if devices else "none (no /dev/nvidia*)"


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU is there (a device node or a loaded driver), whether torch can use it or not."""
    return bool(gpu_nodes()) or driver_version() is not None


def resolve_device(device: str = "auto") -> torch.device:
    """auto: a usable CUDA GPU, else the CPU; when an NVIDIA GPU is present but unusable, a
    warning on stderr says why before running on the CPU. cuda: a usable GPU or a DeviceError
    saying why."""
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if nvidia_gpu_present():
            # A 6B model on the CPU is ~100x slower: that must not pass unnoticed.
            print(f"WARNING: an NVIDIA GPU is present but torch cannot use it, so this runs on "
                  f"the CPU (slowly): {cuda_problem()}. Fix: a torch build for this driver "
                  "(scripts/venv chooses one; CHATGLM3_TORCH=cu128 forces one), or --device cpu "
                  "(CHATGLM3_DEVICE=cpu for the server) to choose the CPU without this warning", file=sys.stderr, flush=True)
        return torch.device("cpu")
    if device == "cuda":
        problem = cuda_problem()
        if problem:
            raise DeviceError(f"device: cuda was asked for, but no CUDA GPU is usable: {problem}. "
                              "It needs an NVIDIA GPU with driver R525 or newer; "
                              "CHATGLM3_DEVICE=cpu (--device cpu) runs on the CPU, slowly")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """fp16 on GPU as the checkpoint is stored; bf16 on CPU (fp16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype: expected auto, float16, bfloat16 or float32, got {dtype!r}")
    return names[dtype]
