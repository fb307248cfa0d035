"""The CPU buffer cache (csrc/cpu/buffer_cache.cpp) from Python: ``cpu_buffer_cache`` scopes one call (the
offline paths' tiles). Scopes are never held across calls: the cache is process-wide, so a scope left open
by an object nobody closed would pin every CPU buffer of the process at its peak."""

from __future__ import annotations

import contextlib
import os

import torch

from . import ops


def _applies(tensor: torch.Tensor) -> bool:
    """Whether ``cpu_buffer_cache`` recycles buffers for work on ``tensor``'s device."""
    return (
        not torch.compiler.is_compiling()
        and tensor.device.type == "cpu"
        and ops._C is not None
        and hasattr(ops._C, "buffer_cache_enter")
        and os.environ.get("DAC_FAST_CPU_CACHE_MB", "64").strip() != "0"
    )


@contextlib.contextmanager
def cpu_buffer_cache(tensor: torch.Tensor):
    """Recycle freed CPU buffers by size inside the block (inference tiles allocate the same sizes tile
    after tile). With glibc's default malloc settings each large temporary is otherwise a fresh mmap whose
    page faults cost as much as the arithmetic; this removes that toll without changing process-wide
    malloc settings. In use + cached bytes stay under the block's peak in use (the cache at least
    DAC_FAST_CPU_CACHE_MB, default 64; 0 turns it off); the cache is freed when the outermost block ends.
    A no-op off CPU, without the extension, and while torch.compile/export traces the call (swapping the
    allocator is a side effect outside any graph; a compiled graph keeps torch's allocator, no graph break)."""
    if not _applies(tensor):
        yield
        return
    ops._C.buffer_cache_enter()
    try:
        yield
    finally:
        ops._C.buffer_cache_exit()
