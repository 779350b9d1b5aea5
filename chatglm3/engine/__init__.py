"""The engine: requests in, text deltas out, on one worker thread. `Engine` (engine.py) takes
checked requests and runs the loop; the scheduler decides each step (who waits, which prompt
chunks run, who decodes); `Steps` carries a step out through the model runner; the output
processor turns token ids into text and stop decisions; the row allocator and the prefix cache
decide who holds which KV row.

May import: the model side (chatglm3.model), text, weights, and the shared leaves (params,
settings, errors, devices, openmp). Never the doors (cli, api, webchat).
"""

from __future__ import annotations

from typing import Any

# `from chatglm3.engine import Engine` is the documented path. Resolved on first use, so that
# importing a light part (the scheduler, the row allocator: no torch) does not load the model
# code with it.
_EXPORTS = {"Engine": "engine", "EngineStats": "engine", "Generation": "output",
            "GenerationResult": "output"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
