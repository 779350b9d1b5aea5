"""Faults injected into a model: an out-of-memory error in the first forward pass a predicate
picks (tests of the engine and of the OpenAI server's 503)."""

from __future__ import annotations

import pytest
import torch


class FailOnce:
    """Wraps model.forward: the first call that `when(kwargs)` accepts raises OutOfMemoryError."""

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, when) -> None:
        self.fired = False
        real = model.forward

        def forward(*args, **kwargs):
            if not self.fired and when(kwargs):
                self.fired = True
                raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "forward", forward)
