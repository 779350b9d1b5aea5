"""The process's heap: giving freed memory back to the system (a leaf: imports nothing of ours)."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Hands freed heap memory back to the system. Quantizing frees each layer's unquantized
    copy right after packing it; with glibc, copies under its mmap threshold (up to 32 MB)
    stay in the heap, fragmented, and the load's memory ends well above its weights'
    (docs/benchmarks.md; tests/test_quantize.py bounds it): malloc_trim. Under
    TCMalloc (scripts/run preloads it where installed) its own call does the same. A no-op
    with neither."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        fn = getattr(process, name, None)
        if fn is not None:
            fn(*args)
            return


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def one_malloc_arena() -> None:
    """glibc: threads started from now on allocate from the arenas that exist, not one of their
    own each. Why: the model loads on a thread of its own (openmp.in_passing_thread), and what
    that thread frees stays fragmented in its arena after it ends: an int4 load kept 1.37x its
    weights' RSS instead of under 1.3x (tests/test_quantize.py). Harmless with TCMalloc, whose
    mallopt does nothing; a no-op where there is no mallopt."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return
    fn = getattr(process, "mallopt", None)
    if fn is not None:
        fn(M_ARENA_MAX, 1)
