#!/usr/bin/env python3
"""Installs the torch build that works on this machine into a virtual environment.

Usage: install_torch.py VENV_PYTHON REQUIREMENTS_TXT [--dry-run]

requirements.txt pins a torch version (torch==X). From the public index that version is a
CUDA 13 build on Linux (several GB of nvidia-* wheels; it needs an NVIDIA driver R580 or
newer), which is the wrong thing on a machine without a GPU or with an older driver. So before
the other requirements are installed this picks one build of that version:

- no NVIDIA GPU (no driver found): the CPU build, from the package sources pip is configured
  with if they hold one (a local wheel, a mirror), else from PyTorch's CPU index;
- driver R580 or newer: the CUDA 13.0 build (PyPI's default);
- driver R525 to R579: the CUDA 12.8 build from PyTorch's cu128 index (CUDA 12 runs on R525+
  through minor-version compatibility);
- an older driver: the CPU build, with a warning (no CUDA build of this torch supports it).

CHATGLM3_TORCH=cpu|cu126|cu128|cu130 forces a build; CHATGLM3_TORCH=keep leaves whatever torch
is installed alone. Standard library only: it runs before anything is installed.
Why not uv's --torch-backend=auto, which detects the same: uv is not a dependency of this
project and pip is always there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PYTORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
# The CUDA builds offered, with the oldest Linux driver each runs on (CUDA 12.x: R525 through
# minor-version compatibility; CUDA 13.x: R580).
CUDA_BUILDS = {"cu126": 525, "cu128": 525, "cu130": 580}
NEWEST_CUDA_12 = "cu128"
PYPI_DEFAULT = "cu130"  # what `pip install torch==X` gets from PyPI on Linux x86_64
CHOICES = ("cpu", *CUDA_BUILDS, "keep")
PROC_VERSION = Path("/proc/driver/nvidia/version")
DEV = Path("/dev")


@dataclass
class Choice:
    variant: str  # cpu, cu126, cu128, cu130 or keep
    reason: str
    warning: str = ""


def driver_version(proc: Path = PROC_VERSION) -> str | None:
    """The NVIDIA kernel driver's version ("550.54.15"), from /proc or nvidia-smi; None without one."""
    try:
        m = re.search(r"\b(\d{3,4}\.\d+(?:\.\d+)?)\b", proc.read_text())
        if m:
            return m[1]
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"\s*(\d{3,4}\.\d+(?:\.\d+)?)", out.stdout) if out.returncode == 0 else None
    return m[1] if m else None


def choose(driver: str | None, forced: str = "") -> Choice:
    """The build for a machine whose NVIDIA driver is `driver` (None: no NVIDIA GPU)."""
    forced = forced.strip().lower()
    if forced:
        if forced not in CHOICES:
            raise ValueError(f"CHATGLM3_TORCH: expected one of {', '.join(CHOICES)}, got {forced!r}")
        return Choice(forced, f"CHATGLM3_TORCH={forced}")
    if driver is None:
        return Choice("cpu", "no NVIDIA GPU found (no driver in /proc/driver/nvidia, no nvidia-smi)")
    major = int(driver.split(".")[0])
    if major >= CUDA_BUILDS[PYPI_DEFAULT]:
        return Choice(PYPI_DEFAULT, f"NVIDIA driver {driver} (R{CUDA_BUILDS[PYPI_DEFAULT]}+ runs CUDA 13)")
    if major >= CUDA_BUILDS[NEWEST_CUDA_12]:
        return Choice(NEWEST_CUDA_12, f"NVIDIA driver {driver} (R525-R579 runs CUDA 12, not 13)")
    return Choice("cpu", f"NVIDIA driver {driver}",
                  warning=f"NVIDIA driver {driver} is older than R525, which every CUDA build of "
                          "this torch needs: installing the CPU build. Update the driver, then "
                          "run again with CHATGLM3_TORCH=cu128 (or remove .venv)")


def wanted_version(pin: str, variant: str) -> str:
    """The installed version string the build reports: 2.13.0+cpu, 2.13.0+cu128; PyPI's
    default build has no local tag."""
    return pin if variant == PYPI_DEFAULT else f"{pin}+{variant}"


def commands(pip: list[str], pin: str, variant: str) -> list[list[str]]:
    """pip commands to try in order until one succeeds. The CPU build is first looked for in
    pip's configured sources alone (which need no other index: a local wheel or a mirror), then
    on PyTorch's CPU index; a CUDA 12 build comes from PyTorch's index for it."""
    install = [*pip, "install", "--disable-pip-version-check"]
    if variant == "cpu":
        return [[*install, f"torch=={pin}+cpu"],
                [*install, f"torch=={pin}", "--index-url", PYTORCH_INDEX.format(variant="cpu"),
                 "--extra-index-url", "https://pypi.org/simple"]]
    if variant == PYPI_DEFAULT:
        return [[*install, f"torch=={pin}"]]
    return [[*install, f"torch=={pin}+{variant}", "--index-url", PYTORCH_INDEX.format(variant=variant),
             "--extra-index-url", "https://pypi.org/simple"]]


def torch_pin(requirements: Path) -> str:
    m = re.search(r"^torch==([\w.]+)\s*$", requirements.read_text(), re.M)
    if not m:
        raise SystemExit(f"{requirements}: no torch==VERSION pin")
    return m[1]


def installed_torch(python: str) -> str | None:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--dry-run"]
    dry = len(args) != len(argv)
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    python, requirements = args[0], Path(args[1])
    try:
        choice = choose(None if os.environ.get("CHATGLM3_TORCH") else driver_version(),
                        os.environ.get("CHATGLM3_TORCH", ""))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if choice.variant == "keep":
        print(f"torch: kept as installed ({choice.reason})", file=sys.stderr)
        return 0
    pin = torch_pin(requirements)
    want = wanted_version(pin, choice.variant)
    have = installed_torch(python)
    if have == want or (choice.variant == "cpu" and have == pin and sys.platform == "darwin"):
        return 0  # already the build this machine needs
    what = "CPU" if choice.variant == "cpu" else f"CUDA {choice.variant[2:-1]}.{choice.variant[-1]}"
    if choice.warning:
        print(f"WARNING: {choice.warning}", file=sys.stderr)
    print(f"torch: installing the {what} build of torch {pin} ({choice.reason}); "
          "CHATGLM3_TORCH=cpu|cu126|cu128|cu130 forces another", file=sys.stderr, flush=True)
    pip = [python, "-m", "pip"]
    steps = commands(pip, pin, choice.variant)
    if have is not None:
        steps = [[*pip, "uninstall", "-y", "torch"], *steps]
    for i, cmd in enumerate(steps):
        print(("would run: " if dry else "+ ") + " ".join(cmd), file=sys.stderr, flush=True)
        if dry:
            continue
        if subprocess.run(cmd).returncode == 0:
            if cmd[3] != "uninstall":
                return 0
        elif i == len(steps) - 1 or cmd[3] == "uninstall":
            print(f"error: could not install torch {want}; see pip's message above", file=sys.stderr)
            return 1
        else:
            print("not in the configured package sources; trying PyTorch's index", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
