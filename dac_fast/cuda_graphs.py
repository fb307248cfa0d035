"""CUDA graphs: capture, the per-model cache of ``DacModel.encode/decode(cuda_graphs=True)`` and the recorded
steps of ``streaming_decoder(cuda_graphs=True)``.

A captured graph replays the exact kernels chosen at capture, so a graph may be reused only where eager code
would launch the same kernels: same input shapes and dtypes (the key's arguments) and the same
``kernel_settings()`` (ops backend, TF32 and reduced-precision flags, cuDNN flags, deterministic mode,
autocast state and dtype). The streaming decoder's recorded steps (``StepGraphs``) use the same capture
and settings.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.nn as nn

from . import ops
from .weight_cache import derived_from, side_store, tensors_key

# model -> its ``derived_from`` entry holding a GraphCache; beside the model, not on it: CUDA graphs cannot be
# deep-copied or pickled
MODEL_GRAPHS = side_store()


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


def tile_graphs(model, name: str, inputs: torch.Tensor, cuda_graphs, inference: bool):
    """For ``cuda_graphs=True``: a wrapper that makes a tile function of ``model``'s network ``name`` replay CUDA graphs, one per
    (network, input shapes, dtype, device, ``cuda_graphs.kernel_settings()``) and weight version, captured on
    first use (a few eager runs of the tile plus the capture: the first call of each shape is slower) and
    kept in the model's ``cuda_graphs.GraphCache`` (sized to the tile shapes one call needs). Any change of
    the weights (in-place update, load_state_dict, ``.to()``) drops every graph. Results equal the eager
    tiles': the graph replays the same kernels on the same shapes. None for ``cuda_graphs=False``. Raises a
    ValueError where graphs cannot run: not CUDA, autograd or training mode, torch.compile. One graphed
    call at a time per model (a graph's static buffers are shared by its replays: concurrent threads would
    overwrite each other's)."""
    if cuda_graphs is False:
        return None
    if cuda_graphs is not True:
        raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if not inference:
        raise ValueError("cuda_graphs=True runs inference only: call model.eval() and encode/decode under "
                         "torch.inference_mode() or torch.no_grad()")
    if inputs.device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model and its inputs on a CUDA device, got {inputs.device}; "
                         "use cuda_graphs=False here")
    if torch.compiler.is_compiling():
        raise ValueError("cuda_graphs=True cannot run under torch.compile (its mode='reduce-overhead' "
                         "captures CUDA graphs itself)")
    # inference-tensor weights: versions not tracked, nothing can be kept (eager tiles)
    cache = derived_from(model, "graphs", list(model.parameters()), GraphCache,
                     store=MODEL_GRAPHS.setdefault(model, {}), untracked=lambda: None)
    if cache is None:
        return lambda fn: fn
    return cache.wrapper(name, kernel_settings(model.backend))


# ----------------------------------------------------------------------------- streaming decoder steps
class CapturedStep:
    """One steady-state decoder step: the latent of f frames and every layer's kept context in static buffers,
    the step recorded by ``capture`` (``capture_cuda_graph``; tests on the CPU pass ``lambda run: run``, which
    replays eagerly through the same bookkeeping)."""

    def __init__(self, decoder: nn.Module, latent: torch.Tensor, layers, capture):
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: copied into in any mode
            self.latent = torch.empty_like(latent).copy_(latent)
            self.context = {n: torch.empty_like(t).copy_(t) for n, t in layers.context.items()}
        position, to_crop = dict(layers.position), dict(layers.to_crop)

        def run():  # the step from the static buffers; its Python bookkeeping is the same at every run
            layers.context, layers.position, layers.to_crop = dict(self.context), dict(position), dict(to_crop)
            audio = decoder.inference(self.latent, layers)
            self.advance = {n: layers.position[n] - position[n] for n in position}
            return audio, dict(layers.context)

        self.replay = capture(run)
        self.to_crop = to_crop
        layers.context, layers.position, layers.to_crop = dict(self.context), position, dict(to_crop)

    def __call__(self, latent: torch.Tensor, layers) -> torch.Tensor:
        position = dict(layers.position)
        self.latent.copy_(latent)
        for name, kept in layers.context.items():
            if kept is not self.context[name]:
                self.context[name].copy_(kept)
        audio, context = self.replay()
        for name, kept in context.items():
            self.context[name].copy_(kept)
        layers.context, layers.to_crop = dict(self.context), dict(self.to_crop)
        layers.position = {n: p + self.advance[n] for n, p in position.items()}
        return audio.clone()  # the static output is overwritten by the next replay


class StepGraphs:
    """``cuda_graphs=True`` of a streaming decoder (``layers``: its ``streaming.LayerStreams``): steady-state pushes replay a recorded step.

    A step is steady when no stream was restarted alone, it is not the flush, every transposed convolution
    has cropped its leading samples, and it leaves every layer's kept context with the shapes it found: then
    the next push of the same size repeats the same kernels on the same shapes. The first such step of a push
    size runs eagerly and marks the (push shape, context shapes, weights) key steady; the next is captured,
    and later ones replay. First pushes, odd-sized pushes, pushes after ``reset(streams)`` (until
    ``LayerStreams.settle``) and ``flush`` run eagerly. At most ``size`` recorded steps are kept (least recently
    used dropped)."""

    def __init__(self, capture, size: int = 4):
        self.capture = capture
        self.size = size
        self.steady: set = set()
        self.steps: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def _shapes(layers) -> tuple:
        return tuple(sorted((name, tuple(t.shape)) for name, t in layers.context.items()))

    def step(self, decoder: nn.Module, latent: torch.Tensor, layers) -> torch.Tensor:
        if layers.starts is not None or layers.final or not layers.context or any(layers.to_crop.values()):
            return decoder.inference(latent, layers)  # not a steady step: eager, without walking the weights
        weights = tensors_key(list(decoder.parameters()))
        if weights is None:
            return decoder.inference(latent, layers)
        key = (tuple(latent.shape), latent.dtype, self._shapes(layers), weights, kernel_settings())
        captured = self.steps.get(key)
        if captured is None and key in self.steady:
            state = dict(layers.context), dict(layers.position), dict(layers.to_crop)
            try:
                captured = self.steps[key] = CapturedStep(decoder, latent, layers, self.capture)
            except BaseException:  # the push fails as a whole: the streams' state is as before it
                layers.context, layers.position, layers.to_crop = state
                raise
            while len(self.steps) > self.size:
                self.steps.popitem(last=False)
        if captured is not None:
            self.steps.move_to_end(key)
            return captured(latent, layers)
        audio = decoder.inference(latent, layers)
        if self._shapes(layers) == key[2] and not any(layers.to_crop.values()):
            self.steady.add(key)
        return audio
