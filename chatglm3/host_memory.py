"""The process's heap: giving freed memory back to the system (a leaf: imports nothing of ours)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def process_library() -> ctypes.CDLL | None:
    """The C library this process runs on (glibc's malloc, or TCMalloc where preloaded), with
    errno kept for the callers that read it; None where it cannot be opened."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hands freed heap memory back to the system. Quantizing frees each layer's unquantized
    copy right after packing it; with glibc, copies under its mmap threshold (up to 32 MB)
    stay in the heap, fragmented, and the load's memory ends well above its weights'
    (docs/benchmarks.md; tests/model/test_quantize.py bounds it): malloc_trim. Under
    TCMalloc (scripts/run preloads it where installed) its own call does the same. A no-op
    with neither."""
    process = process_library()
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        fn = getattr(process, name, None) if process is not None else None
        if fn is not None:
            fn(*args)
            return


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def one_malloc_arena() -> None:
    """glibc: threads started from now on allocate from the arenas that exist, not one of their
    own each. Why: setup work runs on threads that end (openmp.in_passing_thread), and what
    such a thread frees stays fragmented in its arena after it ends: an int4 load kept 1.37x its
    weights' RSS instead of under 1.3x (tests/model/test_quantize.py). Harmless with TCMalloc, whose
    mallopt does nothing; a no-op where there is no mallopt."""
    process = process_library()
    fn = getattr(process, "mallopt", None) if process is not None else None
    if fn is not None:
        fn(M_ARENA_MAX, 1)
