"""Bringing up an engine for serving (Cog's setup, a server): load with the settings, say what
the KV cache and prefix cache are, warm up, and send one short request through the whole path."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .packed_linear import layers_summary
from .engine import Engine
from .messages import build_messages
from .params import SamplingParams
from .settings import Settings


def _print(line: str) -> None:
    print(line, flush=True)


def start(path: str | Path, settings: Settings, device: torch.device,
          say: Callable[[str], None] = _print) -> tuple[Engine, float, float]:
    """The warmed-up engine, with the seconds loading and warming up took."""
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(path, **dict(settings.engine_kwargs(), device=device))
    plan, batch = engine.kv_plan, settings.max_batch
    say(f"quantize: {engine.quantize} (CHATGLM3_QUANTIZE); weights "
        f"{engine.weight_bytes / 2**30:.2f} GiB")
    if (layers := layers_summary(engine.model)) is not None:
        say(layers)
    say(f"KV cache: {plan or 'grows on demand (CPU, no CHATGLM3_KV_BUDGET)'}")
    on = engine.prefix_cache
    why = (f"CHATGLM3_PREFIX_CACHE={int(on)}" if settings.prefix_cache is not None else
           f"the default on a {'GPU' if device.type == 'cuda' else 'CPU'}; "
           f"CHATGLM3_PREFIX_CACHE={'0' if on else '1'} turns it {'off' if on else 'on'}")
    say(f"prefix cache: {'on' if on else 'off'} ({why})")
    if plan is not None and plan.rows < batch:
        say(f"KV cache holds {plan.rows} requests at a time; the other predictions of the "
            f"{batch} allowed wait for a row, in order")
    t1 = time.perf_counter()
    # Every prefill shape, the decoding graphs recorded and checked against eager steps, then
    # one short request through the whole path.
    say(f"warm-up: {engine.warm_up()}")
    engine.generate(build_messages("你好"), SamplingParams(max_tokens=2, temperature=0.0)).text()
    return engine, t1 - t0, time.perf_counter() - t1
