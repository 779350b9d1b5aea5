"""Keeping torch's CPU work to one OpenMP team.

OpenMP (libgomp, torch's CPU threads) keeps a team of helper threads for every thread that ran
a parallel region, for as long as that thread lives. Once a process has more OpenMP threads
than CPUs, libgomp stops spinning at barriers (its "throttled" spin): every helper sleeps and
is woken again at each of the ~1,500 parallel regions of a decoding step, idle ~10% of it
(docs/benchmarks.md, "One OpenMP team"). The engine's worker thread runs the model; work that
would otherwise run on the caller's thread before it (loading, allocating the KV cache) runs
on a thread that ends with it, taking its team along. That thread allocates from the arenas
that exist (host_memory.one_malloc_arena), so what it frees is given back like the caller's.
"""

from __future__ import annotations

import threading
from typing import Callable

from .host_memory import one_malloc_arena


def in_passing_thread(fn: Callable[[], object]) -> object:
    """fn() on a thread of its own that ends with it; its result or its exception.

    A daemon thread, so a Ctrl-C in the waiting caller ends the program without waiting."""
    box: dict[str, object] = {}
    one_malloc_arena()

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="chatglm3-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]
