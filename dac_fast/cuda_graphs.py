"""CUDA-graph capture and the per-model graph cache of ``DacModel.encode/decode(cuda_graphs=True)``.

A captured graph replays the exact kernels chosen at capture, so a graph may be reused only where eager code
would launch the same kernels: same input shapes and dtypes (the key's arguments) and the same
``kernel_settings()`` (ops backend, TF32 and reduced-precision flags, cuDNN flags, deterministic mode,
autocast state and dtype). The streaming decoder's recorded steps (``dac_fast.streaming``) use the same
capture and settings.
"""

from __future__ import annotations

import collections
import contextlib
import weakref

import torch

from . import ops

# model -> its ``derived_from`` entry holding a GraphCache; beside the model, not on it: CUDA graphs cannot be
# deep-copied or pickled
MODEL_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kernel_settings(backend: str | None = None) -> tuple:
    """Everything besides the arguments' shapes and dtypes that changes which kernels eager code launches."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    autocast = torch.is_autocast_enabled("cuda")
    return (backend or ops.current_backend(),
            matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
            matmul.allow_bf16_reduced_precision_reduction, torch.get_float32_matmul_precision(),
            cudnn.enabled, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled(),
            autocast, torch.get_autocast_dtype("cuda") if autocast else None)


def _autocast_without_cache():
    """Autocast as it is now, minus its cast-weight cache: cached casts made inside a capture would live in the
    graph's pool and be freed when autocast exits (torch.cuda.graph's documented restriction)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def capture_cuda_graph(run):
    """``run()`` (computed from static buffers only) captured in a CUDA graph after a side-stream warm-up, as
    torch.cuda.graphs' documentation requires (cuDNN/cuBLAS handles, workspaces and weight-derived caches are
    made outside the capture). Returns ``replay()`` -> run's outputs, recomputed in place. The capture's
    error mode is thread-local: a CUDA call from another thread (a DataLoader's pin-memory thread) during it
    is not an error, as it is in the default global mode."""
    with _autocast_without_cache():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = run()

    def replay():
        graph.replay()
        return outputs

    return replay


class _CapturedCall:
    """One call of ``fn`` recorded by ``capture``: static inputs, the recorded call, its static output."""

    def __init__(self, fn, args, capture):
        # ordinary tensors, so later calls may copy into them in or out of inference mode
        with torch.inference_mode(False), torch.no_grad():
            self.inputs = [torch.empty_like(a).copy_(a) for a in args]
        self.replay = capture(lambda: fn(*self.inputs))

    def __call__(self, *args) -> torch.Tensor:
        """The output for ``args`` (same shapes as recorded); it is overwritten by the next replay."""
        for static, arg in zip(self.inputs, args):
            static.copy_(arg)
        return self.replay()


class GraphCache:
    """A model's recorded tile calls for one version of its weights (a ``derived_from`` entry: any weight change
    builds a new one; ``.to()`` and ``clear_weight_caches`` drop it).

    Sized to the shapes one call needs: a tiled call of a long input runs a few tile shapes (first, middle,
    last), and a cache smaller than that would re-capture every graph at every call. Per network name the
    cache keeps as many graphs as the most distinct keys one call has used so far (the tile plan of the
    longest input seen); beyond that the least recently used graph of that network not used by the running
    call is dropped (each holds a private memory pool of about one tile's activations).
    ``capture``: ``capture_cuda_graph``; tests on the CPU pass a recorder that replays eagerly."""

    def __init__(self, capture=capture_cuda_graph):
        self.capture = capture
        self.calls: collections.OrderedDict = collections.OrderedDict()
        self.capacity: dict = {}  # network name -> most distinct keys one call has used
        self.captures = 0  # graphs recorded so far (a steady workload stops adding to it)

    def wrapper(self, name: str, settings: tuple):
        """``wrap(fn)`` for one call of network ``name``: ``fn``'s tiles replay recorded graphs, keyed on the
        arguments' shapes, dtypes and devices and on ``settings`` (``kernel_settings()``)."""

        def wrap(fn):
            used: set = set()  # the keys of this call: never dropped while it runs

            def run(*args):
                key = (name, *((tuple(a.shape), a.dtype, a.device) for a in args), settings)
                used.add(key)
                self.capacity[name] = max(self.capacity.get(name, 0), len(used))
                return self._call(key, fn, args, used)

            return run

        return wrap

    def _call(self, key, fn, args, used: set) -> torch.Tensor:
        captured = self.calls.get(key)
        if captured is None:
            captured = self.calls[key] = _CapturedCall(fn, args, self.capture)
            self.captures += 1
            self._evict(key[0], used)
        self.calls.move_to_end(key)
        return captured(*args)

    def _evict(self, name: str, used: set) -> None:
        mine = [k for k in self.calls if k[0] == name]  # least recently used first
        droppable = [k for k in mine if k not in used]  # at least the excess: capacity >= len(used)
        for key in droppable[: max(0, len(mine) - self.capacity[name])]:
            del self.calls[key]
