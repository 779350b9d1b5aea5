"""Watching and pacing an engine in tests: the forward passes it runs, and a burst of requests
that arrive together."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import DynamicCache

from chatglm3.engine.engine import Engine
from chatglm3.model.kv_rows import KVRows
from chatglm3.model.packed_step import PackedStep


class Passes:
    """Each forward pass of the model: (tokens, prompt segments, decoding rows)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[tuple[int, int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, _a, kw) -> None:
        cache, n = kw.get("cache"), kw["input_ids"].shape[1]
        if isinstance(cache, PackedStep):
            self.seen.append((n, len(cache.segments), cache.batch))
        elif isinstance(cache, DynamicCache):
            self.seen.append((n, 1, 0))
        elif isinstance(cache, KVRows):
            self.seen.append((n, 0, kw["input_ids"].shape[0]))

    def remove(self) -> None:
        self.handle.remove()


@contextmanager
def held(engine: Engine) -> Iterator[None]:
    """The worker held on a job until the block ends: requests submitted inside arrive
    together, as a burst of clients' would."""
    started, gate = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        gate.wait(30)

    t = threading.Thread(target=engine._on_worker, args=(job,))
    t.start()
    assert started.wait(30)
    try:
        yield
    finally:
        gate.set()
        t.join()
