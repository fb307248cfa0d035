"""Convolution arithmetic of inference: weight norm without building the weight, oneDNN convolutions whose bits do
not depend on length or batch, packed weights for stream windows, the polyphase transposed convolution, and the
flows (``conv_step``) through which offline calls, streams and right-padded batches run the same layers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .weight_cache import derived_from, side_store


def weight_norm_parts(conv: nn.Module):
    """(v, scale) of a convolution reparametrized by ``weight_norm`` (dim 0), else None.

    weight = v * scale along axis 0 with scale = g / ||v|| (norm over the other axes) of shape (weight.shape[0],):
    per output channel for Conv1d (weight (C_out, C_in, k)), per INPUT channel for ConvTranspose1d (weight
    (C_in, C_out, k)).
    """
    if not nn.utils.parametrize.is_parametrized(conv, "weight"):
        return None
    chain = conv.parametrizations.weight
    if len(chain) != 1 or not isinstance(chain[0], nn.utils.parametrizations._WeightNorm) or chain[0].dim != 0:
        return None
    g, v = chain.original0, chain.original1
    return v, g.reshape(-1) / torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())))


def conv_forward(conv: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """``conv(hidden_state)``. Under weight norm the normalized weight is not built: the convolution runs on
    v and the per-channel scale goes to its output (Conv1d) or, for ConvTranspose1d, whose norm runs over
    the input-channel axis, to its input."""
    parts = weight_norm_parts(conv)
    if parts is None:
        return conv(hidden_state)
    v, scale = parts
    if isinstance(conv, nn.ConvTranspose1d):
        return F.conv_transpose1d(hidden_state * scale.view(1, -1, 1), v, conv.bias, conv.stride, conv.padding,
                                  conv.output_padding, conv.groups, conv.dilation)
    out = F.conv1d(hidden_state, v, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.bias is None:
        return out * scale.view(1, -1, 1)
    return torch.addcmul(conv.bias.view(1, -1, 1), out, scale.view(1, -1, 1))


def onednn_applies(hidden_state: torch.Tensor) -> bool:
    """CPU fp32 outside the pure-torch backend. There oneDNN's convolution gives every output element the same
    bits whatever the input's length, crop or batch size, which exact tiles, streams and padded batches rely
    on; F.conv1d would pick a different (native) kernel for small batch-1 inputs. Not while torch.compile or
    torch.export traces (the oneDNN op has no fake-tensor kernel): there the graph holds F.conv1d."""
    return (hidden_state.device.type == "cpu" and hidden_state.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and ops.current_backend() != "torch" and torch.backends.mkldnn.is_available())


def conv_arithmetic(conv: nn.Conv1d, hidden_state: torch.Tensor, padding: int, packed: bool = False) -> torch.Tensor:
    """``conv``'s arithmetic with ``padding`` zeros on each side (its own padding offline, 0 on a stream window).
    ``packed``: see ``packed_conv1d``."""
    args = (conv.weight, conv.bias, padding, conv.stride[0], conv.dilation[0], conv.groups)
    if packed:
        return packed_conv1d(conv, hidden_state, *args)
    return _conv1d(hidden_state, *args)


def _conv1d(hidden_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, stride: int,
            dilation: int, groups: int) -> torch.Tensor:
    if onednn_applies(hidden_state):
        return torch.mkldnn_convolution(hidden_state.contiguous(), weight, bias, (padding,), (stride,), (dilation,),
                                        groups)
    return F.conv1d(hidden_state, weight, bias, stride, padding, dilation, groups)


# weights of at least 1 Mi elements (768 channels and up) are worth packing: below it oneDNN's per-call re-pack
# costs less than the convolution itself, and a packed layout chosen for one window width can run slower at another
_PACK_MIN_NUMEL = 1024 * 1024
# owner module -> its packed weights (``derived_from`` entries); beside the modules, not on them: oneDNN tensors
# cannot be deep-copied or pickled, and a copied model builds its own
PACKED_WEIGHTS = side_store()


def packed_conv1d(owner: nn.Module, hidden_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  padding: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv1d`` with a large ``weight`` (``owner``'s, or derived from it) reordered once per weight version
    into oneDNN's blocked layout.

    ``torch.mkldnn_convolution`` re-packs its weight at every call: 20-40 ms for the decoder's first layers on
    2 cores, ten times the convolution of a short stream window. Packed outputs differ from it at rounding
    level (1e-6 relative) and depend on the window width, so only the streaming decoder uses them (its budget
    against the offline decode is 1e-5); offline calls, tiles, padded batches and the encoder keep
    ``mkldnn_convolution``, whose bits do not depend on the window (identical codes rely on that). Not packed
    where the weight is rebuilt at every call (weight norm, inference tensors): packing would cost more.
    """
    def pack():
        layout_hint = [1, hidden_state.shape[1], 1, 64]
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().unsqueeze(2).to_mkldnn(), [0, padding],
                                                         [1, stride], [1, dilation], groups, layout_hint)

    packed = None
    if weight.numel() >= _PACK_MIN_NUMEL and onednn_applies(hidden_state) and not _weight_normed(owner):
        packed = derived_from(owner, f"packed_{padding}", [weight], pack, store=PACKED_WEIGHTS.setdefault(owner, {}),
                              untracked=lambda: None)
    if packed is None:
        return _conv1d(hidden_state, weight, bias, padding, stride, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(hidden_state.contiguous().unsqueeze(2), packed, bias,
                                                   [0, padding], [1, stride], [1, dilation], groups, "none", [],
                                                   None).squeeze(2)


def _weight_normed(conv: nn.Module) -> bool:
    """Weight norm (parametrized or the old hook): ``conv.weight`` is rebuilt from g and v at every access."""
    return hasattr(conv, "parametrizations") or hasattr(conv, "weight_g")


def conv_transpose_arithmetic(conv: nn.ConvTranspose1d, hidden_state: torch.Tensor) -> torch.Tensor:
    """``conv(hidden_state)`` for a transposed convolution: the polyphase form where it applies."""
    if _polyphase_applies(conv, hidden_state):
        return conv_transpose_polyphase(conv, hidden_state)
    return conv(hidden_state)


def conv_step(conv: nn.Conv1d, hidden_state: torch.Tensor, flow=None) -> torch.Tensor:
    """Every inference convolution goes through here. ``flow`` None: offline, ``conv(hidden_state)``. Otherwise
    ``flow.conv(conv, hidden_state)``: one step of a stream (``dac_fast.streaming``: the input continues what
    came before, the output is what is now final) or a right-padded batch (``PaddedBatch``: each item's input
    is zero beyond its own length, as if it were alone)."""
    if flow is None:
        return conv_arithmetic(conv, hidden_state, conv.padding[0])
    return flow.conv(conv, hidden_state)


def conv_transpose_step(conv: nn.ConvTranspose1d, hidden_state: torch.Tensor, flow=None) -> torch.Tensor:
    """``conv_step`` for the transposed convolutions."""
    if flow is None:
        return conv_transpose_arithmetic(conv, hidden_state)
    return flow.conv_transpose(conv, hidden_state)


def _output_lengths(conv: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """Output lengths of ``conv`` for inputs of ``lengths`` (any shape), 0 where the input is too short."""
    (k,), (s,), (d,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if isinstance(conv, nn.ConvTranspose1d):
        out = (lengths - 1) * s - 2 * p + d * (k - 1) + conv.output_padding[0] + 1
        return torch.where(lengths > 0, out, 0).clamp_min(0)
    return (torch.div(lengths + 2 * p - d * (k - 1) - 1, s, rounding_mode="floor") + 1).clamp_min(0)


def zero_outside(hidden_state: torch.Tensor, first: torch.Tensor, start: torch.Tensor | None = None,
                 stop: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, T) with element t of item b set to 0 unless start[b] <= first + t < stop[b] (None: unbounded)."""
    positions = first + torch.arange(hidden_state.shape[-1], device=hidden_state.device)
    keep = torch.ones(hidden_state.shape[0], positions.shape[0], dtype=torch.bool, device=hidden_state.device)
    if start is not None:
        keep &= positions >= start.view(-1, 1)
    if stop is not None:
        keep &= positions < stop.view(-1, 1)
    return torch.where(keep.unsqueeze(1), hidden_state, 0)


class PaddedBatch:
    """Flow of a right-padded batch: before each convolution, each item's input is zeroed beyond its own valid
    length at that layer (the zero padding it would see alone), so its outputs over its own length equal
    the item's alone. ``lengths`` (B,) valid lengths of the network's input; updated layer by layer."""

    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths

    def conv(self, conv: nn.Conv1d, hidden_state: torch.Tensor) -> torch.Tensor:
        out = conv_arithmetic(conv, zero_outside(hidden_state, 0, stop=self.lengths), conv.padding[0])
        self.lengths = _output_lengths(conv, self.lengths)
        return out

    def conv_transpose(self, conv: nn.ConvTranspose1d, hidden_state: torch.Tensor) -> torch.Tensor:
        out = conv_transpose_arithmetic(conv, zero_outside(hidden_state, 0, stop=self.lengths))
        self.lengths = _output_lengths(conv, self.lengths)
        return out

    def skip(self, unit: nn.Module, hidden_state: torch.Tensor, length: int) -> torch.Tensor:
        return hidden_state


def conv_transpose_polyphase(conv: nn.ConvTranspose1d, hidden_state: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """``conv(hidden_state)`` for a transposed convolution with kernel 2s and stride s, computed as a regular
    2-tap convolution into s * C_out phase channels followed by one interleaving copy.

    torch's CPU ConvTranspose1d takes a slow im2col path plus copies; the regular convolution runs on
    oneDNN. Output phase r of input frame q is sample s*q + r - padding: y = sum_c W[c, :, r] x[c, q] +
    W[c, :, s + r] x[c, q - 1]. The phase weights are built once per weight version (``derived_from``; weights
    made under torch.inference_mode are rebuilt at every call, dac_fast's loaders make ordinary tensors even
    there). ``packed``: see ``packed_conv1d``.
    """
    s, p = conv.stride[0], conv.padding[0]
    c_in, c_out, k = conv.weight.shape
    weight, bias = _phase_weights(conv)
    if packed:  # (B, s * C_out, L + 1)
        phases = packed_conv1d(conv, hidden_state, weight, bias, padding=1)
    else:
        phases = F.conv1d(hidden_state, weight, bias, padding=1)
    batch, _, frames = phases.shape
    length = (hidden_state.shape[-1] - 1) * s - 2 * p + k
    out = phases.view(batch, s, c_out, frames).permute(0, 2, 3, 1).reshape(batch, c_out, frames * s)
    return out[..., p : p + length]


def conv_transpose_inner_frames(conv: nn.ConvTranspose1d, windows: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """What ``conv_transpose_polyphase`` gives for the frames of ``windows`` (B, C_in, L >= 2) that have both
    of their input frames inside the window (phase frames 1 .. L - 1, before any crop): (B, C_out, (L - 1) * s).
    A stream's step: each window is [kept last frame | new frames].

    The B windows run folded along time as ONE sequence (the column that spans two windows is dropped): the
    weight is read once per step, where oneDNN's batched convolution reads a large weight once per window
    (2-3x slower for the decoder's first layers at 3-8 streams of a few frames, 2 cores)."""
    s = conv.stride[0]
    c_in, c_out, _ = conv.weight.shape
    weight, bias = _phase_weights(conv)
    batch, _, frames = windows.shape
    folded = windows.transpose(0, 1).reshape(1, c_in, batch * frames) if batch > 1 else windows
    if packed:  # (1, s * C_out, B * L - 1)
        phases = packed_conv1d(conv, folded, weight, bias, padding=0)
    else:
        phases = F.conv1d(folded, weight, bias)
    # window b's columns are b * L .. b * L + L - 2: a view (s, C_out, B, L - 1) of them, then one interleaving copy
    channel, time = phases.stride(1), phases.stride(2)  # oneDNN may hand back a channels-last layout
    phases = phases.as_strided((s, c_out, batch, frames - 1), (c_out * channel, channel, frames * time, time),
                               phases.storage_offset())
    return phases.permute(2, 1, 3, 0).reshape(batch, c_out, (frames - 1) * s)


def _phase_weights(conv: nn.ConvTranspose1d) -> tuple[torch.Tensor, torch.Tensor]:
    """The polyphase form's 2-tap weight (s * C_out, C_in, 2) and bias, built once per weight version."""
    s = conv.stride[0]
    c_in, c_out, _ = conv.weight.shape

    def build():
        weight = conv.weight.detach().view(c_in, c_out, 2, s).flip(2).permute(3, 1, 0, 2)
        return weight.reshape(s * c_out, c_in, 2).contiguous(), conv.bias.detach().repeat(s)

    return derived_from(conv, "_polyphase", [conv.weight, conv.bias], build)


def _polyphase_applies(conv: nn.ConvTranspose1d, hidden_state: torch.Tensor) -> bool:
    """On CPU, outside the pure-torch backend (which keeps the reference arithmetic bit for bit)."""
    s = conv.stride[0]
    return (hidden_state.device.type == "cpu" and ops.current_backend() != "torch"
            and conv.kernel_size[0] == 2 * s and conv.groups == 1
            and conv.dilation[0] == 1 and conv.output_padding[0] == 0 and conv.bias is not None)
