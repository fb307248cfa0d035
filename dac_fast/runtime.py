"""Process-level settings an application (the CLI, Ray encoder actors, the demo) applies once at start.

A library never changes them on import; ``dac_fast`` itself only calls them from its entry points.
"""

from __future__ import annotations

import sys


def tune_allocator() -> bool:
    """Keep glibc from mmapping/unmapping every large temporary: their page faults cost as much as
    the arithmetic on CPU (benchmarks/RESULTS.md, "Model": default vs tuned allocator).

    Sets M_MMAP_MAX=0 and M_TRIM_THRESHOLD=2**31-1 with mallopt. glibc only; a no-op elsewhere.
    Returns whether both settings took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL("libc.so.6")
        ok1 = libc.mallopt(-4, 0)  # M_MMAP_MAX
        ok2 = libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
        return bool(ok1 and ok2)
    except Exception:
        return False


def allocator_setting(kind: str) -> str:
    """Apply ``kind`` ("tuned": ``tune_allocator``; "default": nothing) and describe it, for benchmark reports.
    Benchmarks call it before importing torch, and compare sides only under one setting."""
    if kind == "default":
        return "glibc default malloc settings"
    if not tune_allocator():
        raise RuntimeError("the tuned allocator needs glibc's mallopt, which is not available here")
    return "glibc tuned: mallopt(M_MMAP_MAX=0), mallopt(M_TRIM_THRESHOLD=2**31-1)"
