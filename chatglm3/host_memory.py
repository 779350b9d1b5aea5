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
