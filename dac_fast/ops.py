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
import os
import threading

import torch
import torch.nn.functional as F

_state = threading.local()
_VALID_BACKENDS = ("auto", "torch", "extension")


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


def _extension_available(device: torch.device) -> bool:
    return False


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
    """Snake activation. x: (B, C, T) fp32/fp16/bf16, alpha: (1, C, 1) or (C,). Returns (B, C, T)."""
    return snake_reference(x, alpha)


def add_snake(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the next Snake. a, b: (B, C, T). Returns (a + b, snake(a + b))."""
    s = a + b
    return s, snake_reference(s, alpha)


def scale_bias_snake(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """snake(scale * y + bias) with per-channel scale, bias, alpha of C elements. y: (B, C, T)."""
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


def rvq_encode(z, in_proj_weight, in_proj_bias, codebook, out_proj_weight, out_proj_bias, n_quantizers, mode="exact"):
    """The whole residual vector quantizer in one call; see ``rvq_encode_reference`` for shapes.

    mode="exact" gives transformers' codes; mode="fast" may reassociate (opt-in, measured agreement).
    """
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
    return rvq_encode_reference(z, in_proj_weight, in_proj_bias, codebook, out_proj_weight, out_proj_bias, n_quantizers)


def rvq_decode_reference(codes, codebook, out_proj_weight, out_proj_bias) -> torch.Tensor:
    """transformers' ``from_codes``: sum_i out_proj_i(codebook_i[codes[:, i]]). codes: (B, n, T) -> (B, D, T)."""
    quantized = 0.0
    for i in range(codes.shape[1]):
        q = F.embedding(codes[:, i, :], codebook[i]).transpose(1, 2)
        quantized = quantized + F.conv1d(q, out_proj_weight[i].unsqueeze(-1), out_proj_bias[i])
    return quantized


def rvq_decode(codes, codebook, out_proj_weight, out_proj_bias) -> torch.Tensor:
    """Decode-from-codes in one call; see ``rvq_decode_reference`` for shapes."""
    return rvq_decode_reference(codes, codebook, out_proj_weight, out_proj_bias)
