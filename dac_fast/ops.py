"""Fused DAC operators: the single dispatch point between the compiled extension and pure torch.

Every function here has the same meaning on every backend. Where the extension `dac_fast._C`
is built for the tensor's device, it runs the fused kernel; otherwise (or when pure torch is
forced with ``DAC_FAST_BACKEND=torch`` or ``with ops.backend("torch")``) it runs the pure-torch
code below, which reproduces transformers' arithmetic op for op.

Shapes: ``B`` batch, ``C``/``D`` channels, ``T`` time, ``N`` codebooks, ``K`` codebook size,
``d`` codebook dimension.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

import torch
import torch.nn.functional as F

_state = threading.local()
_VALID_BACKENDS = ("auto", "torch", "extension")

# ----------------------------------------------------------------------------- the extension
# `dac_fast._C` registers the operators torch.ops.dac_fast.* (schemas in csrc/dac_fast.cpp, CPU
# kernels in csrc/cpu, CUDA kernels in csrc/cuda). It is optional: without it every op below runs
# its pure-torch reference. Debug switch read by the C++ code at every call: DAC_FAST_POISON=1
# fills every output with NaN (codes with -1) before the kernel runs, so tests can show that
# every element is written. DAC_FAST_SNAKE_SIN=fast (CPU, fp32 only, read at every call) swaps the
# bit-identical sine (ATen's own kernel) for a vectorized polynomial one: several times faster,
# ~2 ulp, no longer bit-identical to eager torch / transformers. CUDA always uses sinf.
_C = None
_C_ERROR: str | None = None
_C_SOURCE: str | None = None  # "package" (built ahead of time) or the just-in-time build directory
_KERNEL_DEVICES: frozenset = frozenset()
_OPS = ("snake", "snake_backward", "add_snake", "scale_bias_snake", "rvq_encode", "rvq_decode")

# Just-in-time build. `pip install .` builds in an isolated environment without torch, so the package
# arrives without dac_fast._C; then (and when the prebuilt library does not load, e.g. after a torch
# upgrade) the kernels are compiled on first import into torch's extension cache
# (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), once per torch version and variant, with
# a one-line notice. DAC_FAST_JIT: "auto" (default: build), "0" (never: pure torch, with a warning),
# "1" (build, and fail loudly if the build fails). Concurrent importers (Ray actors, CLI workers):
# one compiles while the others wait on a lock the kernel releases if its holder dies, then load.
_JIT_VALUES = ("auto", "0", "1")


def _jit_mode() -> str:
    mode = os.environ.get("DAC_FAST_JIT", "auto").strip().lower() or "auto"
    if mode not in _JIT_VALUES:
        raise ValueError(f"DAC_FAST_JIT must be one of {_JIT_VALUES}, got {mode!r}")
    return mode


def _jit_variant() -> tuple[bool, str | None]:
    """(with CUDA, CUDA_HOME): CUDA kernels too when a GPU is visible and a toolkit is installed."""
    from . import _build

    cuda_home = _build.find_cuda_home()
    with_cuda = cuda_home is not None and torch.version.cuda is not None and torch.cuda.is_available()
    return with_cuda, cuda_home if with_cuda else None


def _jit_build_directory(with_cuda: bool) -> str:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"dac_fast_{'cuda' if with_cuda else 'cpu'}_torch{torch.__version__}".replace("+", "_").replace(".", "_")
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path


def _jit_build():
    """Compile (or reuse the cached build of) the extension; returns (the module, its build directory)."""
    import fcntl
    import json
    import logging
    import sys

    from . import _build

    # torch warns at import when it has to guess CUDA_HOME; the guess is not used for a CPU build
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)

    sources = _build.source_root()
    if sources is None:
        raise ImportError("the csrc/ sources are not installed with the package")
    with_cuda, cuda_home = _jit_variant()
    directory = _jit_build_directory(with_cuda)
    files = [os.path.join(sources, s) for s in _build.CPU_SOURCES]
    cuda_flags = []
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        _build.default_cuda_arch_list()
        files += [os.path.join(sources, s) for s in _build.CUDA_SOURCES]
        cuda_flags = _build.nvcc_flags(torch.__version__)
    cflags = _build.cxx_flags(torch.__version__) + (["-DDAC_FAST_WITH_CUDA=1"] if with_cuda else [])
    # Our own lock first: flock is released by the kernel when its holder dies, so a build killed
    # midway never blocks the next one. Older torch guards its build with a lock FILE that a killed
    # builder leaves behind (every later load then waits forever): inside our lock nobody else can
    # be building, so such a file is stale and removed.
    with open(os.path.join(directory, "dac_fast.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"dac_fast: waiting for another process compiling the kernels in {directory}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        built = os.path.exists(os.path.join(directory, "_C.so"))
        if not built:
            print(f"dac_fast: compiling the {'CPU + CUDA' if with_cuda else 'CPU'} kernels for torch {torch.__version__} "
                  f"into {directory} (first use only, about {'5-10' if with_cuda else '1-4'} min; DAC_FAST_JIT=0 skips "
                  "them and runs pure torch, slower)", file=sys.stderr, flush=True)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale) and not hasattr(cpp_extension, "FileLock"):
            os.remove(stale)
        module = cpp_extension.load(
            name="_C", sources=files, extra_cflags=cflags, extra_cuda_cflags=cuda_flags or None,
            extra_ldflags=_build.link_flags() + [f"-l{lib}" for lib in _build.libraries()],
            extra_include_paths=[os.path.join(sources, "include")] + (_build.nvidia_pip_includes() if with_cuda else []),
            build_directory=directory, with_cuda=with_cuda, verbose=False)
        info_path = os.path.join(directory, _build.BUILD_INFO)
        if not os.path.exists(info_path):
            with open(info_path, "w") as f:
                json.dump(_build.build_info("just in time (dac_fast.ops)", with_cuda, torch.__version__, cuda_home), f)
    return module, directory


def _warn(message: str) -> None:
    # one line on stderr (no source line): filename without source, lineno 0
    warnings.warn_explicit(message, RuntimeWarning, filename="dac_fast", lineno=0, module="dac_fast.ops")


def _load_extension() -> None:
    global _C, _C_ERROR, _C_SOURCE, _KERNEL_DEVICES
    try:
        ext = importlib.import_module("dac_fast._C")
        _C_SOURCE = "package"
    except Exception as exc:  # ImportError, or an undefined symbol when built against another torch
        _C_ERROR = f"prebuilt: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        mode = _jit_mode()
        if mode == "0":
            _warn(f"compiled extension dac_fast._C not available ({_C_ERROR}) and DAC_FAST_JIT=0: using pure-torch "
                  "ops (slower)")
            return
        try:
            ext, _C_SOURCE = _jit_build()
        except Exception as jit_exc:
            if mode == "1":
                raise
            _C_ERROR += f"; just-in-time build: {type(jit_exc).__name__}: {str(jit_exc).strip().splitlines()[-1][:200] if str(jit_exc).strip() else ''}"
            _warn(f"compiled extension dac_fast._C not available ({_C_ERROR}); using pure-torch ops (slower). "
                  "`dac-fast doctor` tells more")
            return
        _C_ERROR = None
    _C = ext
    devices = set()
    for key, dev in (("CPU", "cpu"), ("CUDA", "cuda")):
        try:
            if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dac_fast::{op}", key) for op in _OPS):
                devices.add(dev)
        except Exception:  # pragma: no cover - very old torch
            pass
    _KERNEL_DEVICES = frozenset(devices)


def extension_status() -> dict:
    """What was loaded: {"loaded": bool, "devices": [...], "error": str | None, "source": "package" or the
    just-in-time build directory, or None}."""
    return {"loaded": _C is not None, "devices": sorted(_KERNEL_DEVICES), "error": _C_ERROR, "source": _C_SOURCE}


def _env_backend() -> str:
    name = os.environ.get("DAC_FAST_BACKEND", "auto").lower()
    if name not in _VALID_BACKENDS:
        raise ValueError(f"DAC_FAST_BACKEND must be one of {_VALID_BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force in this thread: the innermost ``backend(...)`` context, else the env."""
    return getattr(_state, "backend", None) or _env_backend()


@contextlib.contextmanager
def backend(name: str):
    """Force a backend inside a ``with`` block: "auto", "torch" or "extension"."""
    if name not in _VALID_BACKENDS:
        raise ValueError(f"backend must be one of {_VALID_BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def _extension_available(device) -> bool:
    """True when dac_fast._C is loaded and has kernels for ``device``'s type."""
    return _C is not None and torch.device(device).type in _KERNEL_DEVICES


def _use(tensor: torch.Tensor, supported: bool = True) -> bool:
    """use_extension, falling back to pure torch in "auto" for inputs the kernels do not take."""
    if not supported and current_backend() == "auto":
        return False
    return use_extension(tensor)


_SNAKE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def use_extension(tensor: torch.Tensor) -> bool:
    """True when the fused kernel should run for ``tensor``."""
    choice = current_backend()
    if choice == "torch":
        return False
    available = _extension_available(tensor.device)
    if choice == "extension" and not available:
        raise RuntimeError(f"backend 'extension' was forced but dac_fast._C has no kernels for {tensor.device}")
    return available


# ----------------------------------------------------------------------------- pure torch
def snake_reference(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake as transformers computes it: x + 1/(alpha + 1e-9) * sin(alpha * x)^2."""
    shape = x.shape
    x = x.reshape(shape[0], shape[1], -1)
    alpha = alpha.reshape(1, -1, 1)
    y = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    return y.reshape(shape)


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation. x: (B, C, T) fp32/fp16/bf16 (fp64 too), alpha: (1, C, 1) or (C,). Returns (B, C, T).

    The kernel computes in fp32 (fp64 for fp64 input); on CPU its fp32 result is bit-identical to
    ``snake_reference``. Differentiable in x and alpha.
    """
    if _use(x, x.dim() == 3 and x.dtype in _SNAKE_DTYPES):
        return torch.ops.dac_fast.snake(x, alpha)
    return snake_reference(x, alpha)


def add_snake(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the next Snake. a, b: (B, C, T). Returns (a + b, snake(a + b))."""
    if _use(a, a.dim() == 3 and a.dtype in _SNAKE_DTYPES and b.dtype == a.dtype and b.shape == a.shape):
        return tuple(torch.ops.dac_fast.add_snake(a, b, alpha))
    s = a + b
    return s, snake_reference(s, alpha)


def scale_bias_snake(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """snake(scale * y + bias) with per-channel scale, bias, alpha of C elements. y: (B, C, T).

    Differentiable in y, scale, bias and alpha (so a weight-normalized conv's g/||v|| scale trains).
    """
    if _use(y, y.dim() == 3 and y.dtype in _SNAKE_DTYPES):
        return torch.ops.dac_fast.scale_bias_snake(y, scale, bias, alpha)
    c = y.shape[1]
    return snake_reference(y * scale.reshape(1, c, 1) + bias.reshape(1, c, 1), alpha)


def rvq_encode_reference(
    z: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    codebook: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    n_quantizers: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' residual vector quantizer (eval mode), op for op.

    z: (B, D, T); in_proj_weight: (N, d, D); in_proj_bias: (N, d); codebook: (N, K, d);
    out_proj_weight: (N, D, d); out_proj_bias: (N, D); the first ``n_quantizers`` codebooks run.
    Returns codes (B, n, T) int64, quantized_representation (B, D, T), projected_latents (B, n*d, T).
    """
    residual = z
    quantized = 0
    codes, latents = [], []
    for i in range(n_quantizers):
        projected = F.conv1d(residual, in_proj_weight[i].unsqueeze(-1), in_proj_bias[i])
        b, d, t = projected.shape
        encodings = F.normalize(projected.permute(0, 2, 1).reshape(b * t, d))
        cb = F.normalize(codebook[i])
        l2_norm = encodings.pow(2).sum(1, keepdim=True)
        dist = -(l2_norm - 2 * encodings @ cb.t()) + cb.pow(2).sum(1, keepdim=True).t()
        indices = dist.max(1)[1].reshape(b, -1)
        q = F.embedding(indices, codebook[i]).transpose(1, 2)
        # transformers applies the straight-through step even in eval; p + (q - p) rounds differently from q,
        # and exact parity needs the same rounding.
        q = projected + (q - projected)
        out = F.conv1d(q, out_proj_weight[i].unsqueeze(-1), out_proj_bias[i])
        quantized = quantized + out
        residual = residual - out
        codes.append(indices)
        latents.append(projected)
    return torch.stack(codes, dim=1), quantized, torch.cat(latents, dim=1)


def rvq_encode(z, in_proj_weight, in_proj_bias, codebook, out_proj_weight, out_proj_bias, n_quantizers, mode="exact",
               normalized_codebook=None):
    """The whole residual vector quantizer in one call; see ``rvq_encode_reference`` for shapes.

    mode="exact" gives transformers' codes; mode="fast" may reassociate (opt-in, measured agreement).
    ``normalized_codebook``: ``F.normalize(codebook, dim=-1)`` when the caller keeps it (the model caches it per
    weight version); otherwise the op normalizes the codebooks at every call. The same bits either way.
    """
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
    if _use(z, _rvq_supported(z, codebook)) and not needs_grad(z, in_proj_weight, in_proj_bias, codebook, out_proj_weight, out_proj_bias):
        codes, quantized, latents = torch.ops.dac_fast.rvq_encode(
            z, in_proj_weight, in_proj_bias, codebook, out_proj_weight, out_proj_bias, int(n_quantizers), mode == "exact",
            normalized_codebook,
        )
        return codes, quantized, latents
    return rvq_encode_reference(z, in_proj_weight, in_proj_bias, codebook, out_proj_weight, out_proj_bias, n_quantizers)


def rvq_decode_reference(codes, codebook, out_proj_weight, out_proj_bias) -> torch.Tensor:
    """transformers' ``from_codes``: sum_i out_proj_i(codebook_i[codes[:, i]]). codes: (B, n, T) -> (B, D, T)."""
    quantized = 0.0
    for i in range(codes.shape[1]):
        q = F.embedding(codes[:, i, :], codebook[i]).transpose(1, 2)
        quantized = quantized + F.conv1d(q, out_proj_weight[i].unsqueeze(-1), out_proj_bias[i])
    return quantized


def rvq_decode(codes, codebook, out_proj_weight, out_proj_bias) -> torch.Tensor:
    """Decode-from-codes in one call; see ``rvq_decode_reference`` for shapes. Codes outside [0, 1024) raise on
    the CPU; on CUDA the op reads nothing back (no host synchronisation) and their rows come out NaN:
    ``DacModel.decode`` checks the range in its one batched input read."""
    if _use(codes, _rvq_supported(codebook, codebook)) and not needs_grad(codebook, out_proj_weight, out_proj_bias):
        return torch.ops.dac_fast.rvq_decode(codes, codebook, out_proj_weight, out_proj_bias)
    return rvq_decode_reference(codes, codebook, out_proj_weight, out_proj_bias)


def _rvq_supported(x: torch.Tensor, codebook: torch.Tensor) -> bool:
    # the kernels take fp32 with codebooks of 1024 entries of dimension 8 (every DAC checkpoint)
    return x.dtype == torch.float32 and codebook.dim() == 3 and tuple(codebook.shape[1:]) == (1024, 8)


def needs_grad(*tensors) -> bool:
    """Autograd must record: grad mode is on and one of ``tensors`` requires grad. The quantizer kernels
    are inference-only; under autograd the reference keeps gradients exact."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- registration
def _register() -> None:
    """Fake (meta) kernels for torch.compile and autograd formulas for the trainable ops."""
    lib = "dac_fast::"

    def contiguous_like(t, dtype=None):
        return t.new_empty(t.shape, dtype=dtype or t.dtype)

    torch.library.register_fake(lib + "snake")(lambda x, alpha: contiguous_like(x))
    torch.library.register_fake(lib + "snake_backward")(
        lambda grad, x, alpha: (contiguous_like(x), alpha.new_empty(alpha.shape))
    )
    torch.library.register_fake(lib + "add_snake")(lambda a, b, alpha: (contiguous_like(a), contiguous_like(a)))
    torch.library.register_fake(lib + "scale_bias_snake")(lambda y, scale, bias, alpha: contiguous_like(y))

    def rvq_encode_fake(z, in_w, in_b, codebook, out_w, out_b, n_quantizers, exact, normalized_codebook=None):
        b, d, t = z.shape
        n = int(n_quantizers)
        dim = codebook.shape[2]
        return (z.new_empty((b, n, t), dtype=torch.long), z.new_empty((b, d, t)), z.new_empty((b, n * dim, t)))

    torch.library.register_fake(lib + "rvq_encode")(rvq_encode_fake)

    def rvq_decode_fake(codes, codebook, out_w, out_b):
        b, _, t = codes.shape
        return codebook.new_empty((b, out_w.shape[1], t))

    torch.library.register_fake(lib + "rvq_decode")(rvq_decode_fake)

    # snake: d/dx and d/dalpha by the fused backward kernel
    def snake_setup(ctx, inputs, output):
        x, alpha = inputs
        ctx.save_for_backward(x, alpha)

    def snake_bwd(ctx, grad):
        x, alpha = ctx.saved_tensors
        gx, galpha = torch.ops.dac_fast.snake_backward(grad, x, alpha)
        return gx, galpha

    torch.library.register_autograd(lib + "snake", snake_bwd, setup_context=snake_setup)

    # add_snake: s = a + b, y = snake(s); grad_a = grad_b = g_s + dy/ds * g_y
    def add_setup(ctx, inputs, output):
        _, _, alpha = inputs
        ctx.save_for_backward(output[0], alpha)

    def add_bwd(ctx, g_sum, g_y):
        s, alpha = ctx.saved_tensors
        if g_y is None:
            g_y = torch.zeros_like(s)
        gs, galpha = torch.ops.dac_fast.snake_backward(g_y, s, alpha)
        if g_sum is not None:
            gs = gs + g_sum
        return gs, gs, galpha

    torch.library.register_autograd(lib + "add_snake", add_bwd, setup_context=add_setup)

    # scale_bias_snake: u = scale * y + bias recomputed in the math dtype, then the snake backward
    def sbs_setup(ctx, inputs, output):
        y, scale, bias, alpha = inputs
        ctx.save_for_backward(y, scale, bias, alpha)

    def sbs_bwd(ctx, grad):
        y, scale, bias, alpha = ctx.saved_tensors
        c = y.shape[1]
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        sc = scale.reshape(1, c, 1).to(acc)
        yf = y.to(acc)
        u = yf * sc + bias.reshape(1, c, 1).to(acc)
        gu, galpha = torch.ops.dac_fast.snake_backward(grad.to(acc), u, alpha)
        grad_y = (gu * sc).to(y.dtype)
        grad_scale = (gu * yf).sum((0, 2)).reshape(scale.shape).to(scale.dtype)
        grad_bias = gu.sum((0, 2)).reshape(bias.shape).to(bias.dtype)
        return grad_y, grad_scale, grad_bias, galpha

    torch.library.register_autograd(lib + "scale_bias_snake", sbs_bwd, setup_context=sbs_setup)


_load_extension()
if _C is not None:
    _register()
