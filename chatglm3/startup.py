"""Bringing up a ready engine: the one start-up path of every door (Cog's setup, the CLI's chat
and generate, `serve`), with the same checks in the same order and the same log lines.

Device first (a missing GPU should not cost a 12 GB download), then the weights (fetched and
checked), the load, one line per choice that shapes serving (weights, how the linear layers
multiply, KV cache, prefix cache), the warm-up (on a GPU every prefill shape and the decoding
graphs, checked against eager steps; on a CPU the prefill shapes would cost a 6B model minutes)
and one short request through the whole path.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .devices import resolve_device, resolve_dtype
from .weights.download import resolve_weights
from .engine.engine import Engine
from .text.messages import build_messages
from .model.packed_linear import layers_summary
from .params import SamplingParams
from .model.quantize import check_mode, compute_dtype
from .settings import Settings


@dataclass(frozen=True)
class Started:
    """A ready engine and what bringing it up took (seconds per part)."""

    engine: Engine
    weights: Path
    device: torch.device
    check_s: float  # device and settings
    fetch_s: float  # weights fetched (if needed) and verified
    load_s: float
    warm_s: float  # warm-up and the first request


def start_engine(weights: str | Path | None, settings: Settings, say: Callable[[str], None],
                 progress: bool = False, knob: str = "--weights") -> Started:
    """Checks `settings` against the device, fetches `weights` (what the CLI's --weights
    takes; None = the official checkpoint), loads and warms up, reporting through `say`.
    `progress`: download and shard progress on stderr; `knob`: what errors about the weights
    call their source (the CLI flag, or Cog's COG_WEIGHTS)."""
    t0 = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = compute_dtype(check_mode(settings.quantize), device,
                          resolve_dtype(settings.dtype, device))
    if settings.decode_step == "graphs" and device.type != "cuda":
        raise ValueError("decode_step: graphs needs a CUDA device")
    t1 = time.perf_counter()
    path = resolve_weights(weights, progress=progress, knob=knob)
    t2 = time.perf_counter()
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    quantized = ("" if settings.quantize == "none"
                 else f", linear layers quantized to {settings.quantize}")
    say(f"loading weights {Path(path).absolute()} on {where} as "
        f"{str(dtype).removeprefix('torch.')}{quantized}")
    engine = Engine.from_pretrained(path, progress=progress,
                                    **dict(settings.engine_kwargs(), device=device, dtype=dtype))
    for line in _serving_lines(engine, settings, device):
        say(line)
    t3 = time.perf_counter()
    warm = engine.warm_up(prefill=device.type == "cuda")
    engine.generate(build_messages("你好"), SamplingParams(max_tokens=2, temperature=0.0)).text()
    say(f"warm-up: {warm}")
    t4 = time.perf_counter()
    say(f"ready in {t4 - t0:.1f} s ({memory_used(device)})")
    return Started(engine, Path(path), device, t1 - t0, t2 - t1, t3 - t2, t4 - t3)


def _serving_lines(engine: Engine, settings: Settings, device: torch.device) -> list[str]:
    """What the load chose that shapes serving, one line each."""
    lines = []
    if engine.quantize != "none":
        lines.append(f"weights: {_size(engine.weight_bytes)} (quantize {engine.quantize})")
    if (layers := layers_summary(engine.model)) is not None:
        lines.append(layers)
    plan = engine.kv_plan
    lines.append(f"KV cache: {plan or 'grows on demand (CPU, no KV budget set)'}")
    on = engine.prefix_cache
    why = ("as set: CHATGLM3_PREFIX_CACHE or --no-prefix-cache" if settings.prefix_cache
           is not None else
           f"the default on a {'GPU' if device.type == 'cuda' else 'CPU'}; "
           f"CHATGLM3_PREFIX_CACHE={'0' if on else '1'} turns it {'off' if on else 'on'}")
    lines.append(f"prefix cache: {'on' if on else 'off'} ({why})")
    if plan is not None and plan.rows < settings.max_batch:
        lines.append(f"KV cache holds {plan.rows} requests at a time; the others of the "
                     f"{settings.max_batch} allowed wait for a row, in order")
    return lines


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_used(device: torch.device) -> str:
    """GPU memory allocated on CUDA (the weights and buffers torch holds); otherwise the peak
    resident memory of this process, which is what the weights cost on the CPU."""
    if device.type == "cuda":
        return f"GPU memory allocated {_size(torch.cuda.memory_allocated(device))}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"peak RSS {_size(peak if sys.platform == 'darwin' else peak * 1024)}"  # KiB on Linux
