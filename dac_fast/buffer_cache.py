"""The CPU buffer cache (csrc/cpu/buffer_cache.cpp) from Python: ``cpu_buffer_cache`` scopes one call (the
offline paths' tiles), ``BufferCacheHold`` keeps a scope open across a streaming object's pushes."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch

from . import ops


def _applies(tensor: torch.Tensor) -> bool:
    """Whether ``cpu_buffer_cache`` / ``BufferCacheHold`` recycle buffers for work on ``tensor``'s device."""
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


class BufferCacheHold:
    """One open ``cpu_buffer_cache`` scope that spans calls: a streaming object's pushes allocate the same
    sizes push after push, and a scope per push would free its cache at every push's end. ``hold(tensor)``
    opens it (once; a no-op where ``cpu_buffer_cache`` is one), ``release()`` closes it (idempotent), and
    so does garbage collection of the holder. The C++ cache is process-wide (one mutex, one count of open
    scopes), so holds of several objects in several threads nest like ``cpu_buffer_cache`` blocks; the
    cached buffers are freed when the last open scope closes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def hold(self, tensor: torch.Tensor) -> None:
        if self.held or not _applies(tensor):
            return
        with self._lock:
            if not self.held:
                ops._C.buffer_cache_enter()
                # a finalizer, not __del__: it runs at most once, also at interpreter exit
                self._finalizer = weakref.finalize(self, ops._C.buffer_cache_exit)

    def release(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()

    @contextlib.contextmanager
    def releasing(self):
        """Release when the block ends, however it ends."""
        try:
            yield
        finally:
            self.release()
