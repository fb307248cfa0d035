"""DAC model with transformers' module tree and parameter names, running dac_fast's fused ops.

The submodules mirror ``transformers.models.dac.modeling_dac`` one for one, so state dicts are
interchangeable. All fused arithmetic goes through ``dac_fast.ops`` (the one dispatch point);
with ``backend="torch"`` every op is the reference arithmetic.

Shapes: B batch, T samples, F latent frames (T / hop_length), D latent width, N codebooks,
d codebook dimension.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cuda_graphs as cuda_graphs_module  # encode/decode's cuda_graphs argument shadows the name
from . import ops
from .configuration import DacConfig, n_quantizers_problem
from .feature_extraction import pcm_to_float
from .outputs import DacDecoderOutput, DacEncoderOutput, DacOutput


class Snake1d(nn.Module):
    """Snake activation with a learned per-channel ``alpha`` of shape (1, C, 1)."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, hidden_dim, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        return ops.snake(hidden_states, self.alpha)


def tensors_key(tensors):
    """What identifies ``tensors`` for a cache built from them: versions, storage addresses, dtype and device;
    None where they cannot be tracked (under torch.compile/export; inference tensors, whose in-place updates
    bump no version) or an autograd graph needs them."""
    if torch.compiler.is_compiling() or ops.needs_grad(*tensors) or any(t.is_inference() for t in tensors):
        return None
    return tuple((t._version, t.data_ptr()) for t in tensors) + (tensors[0].dtype, tensors[0].device)


def derived_from(owner: nn.Module, name: str, tensors, build, store: dict | None = None, untracked=None):
    """``build()``, a value computed from ``tensors`` (e.g. stacked or normalized weights), cached under ``name``
    in ``owner``'s ``_derived`` dict until one of them changes: an in-place update (load_state_dict, ``w.mul_()`` under
    no_grad) bumps its version, ``.to()``/``.half()`` give it new storage. The entry keeps the tensors it was
    built from alive, so their addresses cannot be reused by other weights while it exists (a model copied or
    unpickled carries entries naming storages that are not its own: they never match). Entries hold ordinary
    tensors only (built outside inference mode, without autograd), so the model still deep-copies and pickles;
    values that cannot be copied go to a ``store`` beside the module instead. Not cached where ``tensors_key``
    is None: then ``untracked()`` if given (for values too costly to build at every call), else ``build()``.
    Updates through ``.data`` bump no version and are not seen: call ``DacModel.clear_weight_caches()`` after
    them."""
    key = tensors_key(tensors)
    if key is None:
        return build() if untracked is None else untracked()
    store = owner.__dict__.setdefault("_derived", {}) if store is None else store
    entry = store.get(name)
    if entry is not None and entry[0] == key and all(a.data_ptr() == b.data_ptr() for a, b in zip(entry[1], tensors)):
        return entry[2]
    with torch.inference_mode(False), torch.no_grad():
        value = build()
        sources = [t.detach() for t in tensors]
    store[name] = (key, sources, value)
    return value


class DacVectorQuantize(nn.Module):
    """One codebook: factorized (in_proj to d dims), L2-normalized nearest-neighbour lookup."""

    def __init__(self, config: DacConfig):
        super().__init__()
        self.codebook_dim = config.codebook_dim
        self.in_proj = nn.Conv1d(config.hidden_size, config.codebook_dim, kernel_size=1)
        self.out_proj = nn.Conv1d(config.codebook_dim, config.hidden_size, kernel_size=1)
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)

    def forward(self, hidden_state: torch.Tensor):
        """(B, D, F) -> quantized (B, D, F), commitment_loss, codebook_loss, codes (B, F), latents (B, d, F)."""
        projected_latents = self.in_proj(hidden_state)
        quantized_representation, audio_codes = self.decode_latents(projected_latents)
        commitment_loss = F.mse_loss(projected_latents, quantized_representation.detach(), reduction="mean")
        codebook_loss = F.mse_loss(quantized_representation, projected_latents.detach(), reduction="mean")
        # Straight-through estimator: identity forward, gradient to the encoder backward.
        quantized_representation = projected_latents + (quantized_representation - projected_latents).detach()
        quantized_representation = self.out_proj(quantized_representation)
        return quantized_representation, commitment_loss, codebook_loss, audio_codes, projected_latents

    def decode_latents(self, hidden_states: torch.Tensor):
        """(B, d, F) -> un-normalized codebook rows (B, d, F), codes (B, F)."""
        batch_size, hidden_dim, sequence_length = hidden_states.shape
        encodings = hidden_states.permute(0, 2, 1).reshape(batch_size * sequence_length, hidden_dim)
        encodings = F.normalize(encodings)
        weight = self.codebook.weight
        codebook = derived_from(self, "_normalized_codebook", [weight], lambda: F.normalize(weight))
        l2_norm = encodings.pow(2).sum(1, keepdim=True)
        dist = -(l2_norm - 2 * encodings @ codebook.t()) + codebook.pow(2).sum(1, keepdim=True).t()
        indices = dist.max(1)[1].reshape(batch_size, -1)
        quantized_representation = self.codebook(indices).transpose(1, 2)
        return quantized_representation, indices


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


class DacResidualUnit(nn.Module):
    """Snake, dilated conv k=7, Snake, conv k=1, plus the (centre-cropped) input."""

    def __init__(self, dimension: int = 16, dilation: int = 1):
        super().__init__()
        pad = ((7 - 1) * dilation) // 2
        self.snake1 = Snake1d(dimension)
        self.conv1 = nn.Conv1d(dimension, dimension, kernel_size=7, dilation=dilation, padding=pad)
        self.snake2 = Snake1d(dimension)
        self.conv2 = nn.Conv1d(dimension, dimension, kernel_size=1)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        parts = weight_norm_parts(self.conv1)
        if parts is None:
            activated = self.snake2(self.conv1(self.snake1(hidden_state)))
        else:  # weight norm: conv1's g / ||v|| scale and bias run inside snake2, the weight is never built
            v, scale = parts
            conv = self.conv1
            branch = F.conv1d(self.snake1(hidden_state), v, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            activated = ops.scale_bias_snake(branch, scale, conv.bias, self.snake2.alpha)
        output_tensor = conv_forward(self.conv2, activated)
        padding = (hidden_state.shape[-1] - output_tensor.shape[-1]) // 2
        if padding > 0:
            hidden_state = hidden_state[..., padding:-padding]
        return hidden_state + output_tensor


def _needs_graph(module: nn.Module, inputs: torch.Tensor) -> bool:
    """Autograd must record the call: grad mode is on and the input or a parameter of ``module`` requires grad."""
    return ops.needs_grad(inputs, *module.parameters())


def _inference(hidden_state: torch.Tensor, module: nn.Module) -> bool:
    """True when the fused inference structure may run: eval mode and no autograd graph needed."""
    return not module.training and not _needs_graph(module, hidden_state)


def _residual_chain(units, hidden_state: torch.Tensor, next_alpha: torch.Tensor, flow=None) -> torch.Tensor:
    """Inference through residual units (B, C, T) -> snake_next(output) (B, C, T).

    Each unit's residual add is fused with the Snake that follows it (the next unit's snake1, or
    ``next_alpha`` after the last), so the stream is read and written once per unit boundary. The
    arithmetic is the reference's: the same convolutions, the same add, the same Snake. ``flow``: see
    ``conv_step`` (a stream's branch lags its input by conv1's right context, so the skip is delayed to match).
    """
    activated = units[0].snake1(hidden_state)
    for i, unit in enumerate(units):
        branch = conv_step(unit.conv2, unit.snake2(conv_step(unit.conv1, activated, flow)), flow)
        alpha = units[i + 1].snake1.alpha if i + 1 < len(units) else next_alpha
        # convolutions here keep the length ("same" padding), so the reference's centre crop never applies
        skip = hidden_state if flow is None else flow.skip(unit, hidden_state, branch.shape[-1])
        hidden_state, activated = ops.add_snake(skip, branch, alpha)
    return activated


# ----------------------------------------------------------------------------- inference convolutions
def _onednn_applies(hidden_state: torch.Tensor) -> bool:
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
    if _onednn_applies(hidden_state):
        return torch.mkldnn_convolution(hidden_state.contiguous(), weight, bias, (padding,), (stride,), (dilation,),
                                        groups)
    return F.conv1d(hidden_state, weight, bias, stride, padding, dilation, groups)


# weights of at least 1 Mi elements (768 channels and up) are worth packing: below it oneDNN's per-call re-pack
# costs less than the convolution itself, and a packed layout chosen for one window width can run slower at another
_PACK_MIN_NUMEL = 1024 * 1024
# owner module -> its packed weights (``derived_from`` entries); beside the modules, not on them: oneDNN tensors
# cannot be deep-copied or pickled, and a copied model builds its own
_PACKED_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    if weight.numel() >= _PACK_MIN_NUMEL and _onednn_applies(hidden_state) and not _weight_normed(owner):
        packed = derived_from(owner, f"packed_{padding}", [weight], pack, store=_PACKED_WEIGHTS.setdefault(owner, {}),
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

    def phase_weights():
        weight = conv.weight.detach().view(c_in, c_out, 2, s).flip(2).permute(3, 1, 0, 2)
        return weight.reshape(s * c_out, c_in, 2).contiguous(), conv.bias.detach().repeat(s)

    cached = derived_from(conv, "_polyphase", [conv.weight, conv.bias], phase_weights)
    if packed:  # (B, s * C_out, L + 1)
        phases = packed_conv1d(conv, hidden_state, cached[0], cached[1], padding=1)
    else:
        phases = F.conv1d(hidden_state, cached[0], cached[1], padding=1)
    batch, _, frames = phases.shape
    length = (hidden_state.shape[-1] - 1) * s - 2 * p + k
    out = phases.view(batch, s, c_out, frames).permute(0, 2, 3, 1).reshape(batch, c_out, frames * s)
    return out[..., p : p + length]


def _polyphase_applies(conv: nn.ConvTranspose1d, hidden_state: torch.Tensor) -> bool:
    """On CPU, outside the pure-torch backend (which keeps the reference arithmetic bit for bit)."""
    s = conv.stride[0]
    return (hidden_state.device.type == "cpu" and ops.current_backend() != "torch"
            and conv.kernel_size[0] == 2 * s and conv.groups == 1
            and conv.dilation[0] == 1 and conv.output_padding[0] == 0 and conv.bias is not None)


class DacEncoderBlock(nn.Module):
    """Three residual units (dilations 1, 3, 9), Snake, strided conv doubling the channels."""

    def __init__(self, config: DacConfig, stride: int = 1, stride_index: int = 1):
        super().__init__()
        dimension = config.encoder_hidden_size * 2**stride_index
        self.res_unit1 = DacResidualUnit(dimension // 2, dilation=1)
        self.res_unit2 = DacResidualUnit(dimension // 2, dilation=3)
        self.res_unit3 = DacResidualUnit(dimension // 2, dilation=9)
        self.snake1 = Snake1d(dimension // 2)
        self.conv1 = nn.Conv1d(
            dimension // 2, dimension, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, 2C, T / stride)."""
        hidden_state = self.res_unit2(self.res_unit1(hidden_state))
        hidden_state = self.snake1(self.res_unit3(hidden_state))
        return conv_forward(self.conv1, hidden_state)


class DacDecoderBlock(nn.Module):
    """Snake, transposed conv halving the channels, three residual units (dilations 1, 3, 9)."""

    def __init__(self, config: DacConfig, stride: int = 1, stride_index: int = 1):
        super().__init__()
        input_dim = config.decoder_hidden_size // 2**stride_index
        output_dim = config.decoder_hidden_size // 2 ** (stride_index + 1)
        self.snake1 = Snake1d(input_dim)
        self.conv_t1 = nn.ConvTranspose1d(
            input_dim, output_dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )
        self.res_unit1 = DacResidualUnit(output_dim, dilation=1)
        self.res_unit2 = DacResidualUnit(output_dim, dilation=3)
        self.res_unit3 = DacResidualUnit(output_dim, dilation=9)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C / 2, T * stride)."""
        hidden_state = conv_forward(self.conv_t1, self.snake1(hidden_state))
        hidden_state = self.res_unit2(self.res_unit1(hidden_state))
        return self.res_unit3(hidden_state)


class DacResidualVectorQuantizer(nn.Module):
    """Residual vector quantizer over ``n_codebooks`` codebooks (SoundStream / improved VQGAN)."""

    def __init__(self, config: DacConfig):
        super().__init__()
        self.n_codebooks = config.n_codebooks
        self.quantizer_dropout = config.quantizer_dropout
        self.quantizers = nn.ModuleList([DacVectorQuantize(config) for _ in range(config.n_codebooks)])
        self.mode = "exact"  # "fast" trades exact agreement with transformers for speed (opt-in)

    def stacked_parameters(self):
        """Codebook parameters stacked for the fused ops: in_proj (N, d, D), (N, d); codebook (N, K, d);
        out_proj (N, D, d), (N, D). Stacked once per weight version (``derived_from``) when no autograd
        graph needs them."""
        return derived_from(self, "_stacked", list(self.parameters()), self._stack_parameters)

    def _stack_parameters(self):
        qs = self.quantizers
        return (
            torch.stack([q.in_proj.weight[..., 0] for q in qs]),
            torch.stack([q.in_proj.bias for q in qs]),
            torch.stack([q.codebook.weight for q in qs]),
            torch.stack([q.out_proj.weight[..., 0] for q in qs]),
            torch.stack([q.out_proj.bias for q in qs]),
        )

    def forward(self, hidden_state: torch.Tensor, n_quantizers: int | None = None):
        """(B, D, F) -> quantized (B, D, F), codes (B, n, F), latents (B, n * d, F), commitment_loss (B,),
        codebook_loss (B,). In training, quantizer dropout draws the number of codebooks per item."""
        n_quantizers = n_quantizers if n_quantizers is not None else self.n_codebooks
        if _inference(hidden_state, self):
            return self._forward_inference(hidden_state, n_quantizers)
        return self._forward_reference(hidden_state, n_quantizers)

    def encode_frames(self, hidden_state: torch.Tensor, n_quantizers: int, stacked=None):
        """Inference quantization (B, D, F) -> codes (B, n, F), quantized (B, D, F), latents (B, n * d, F).

        Every frame is quantized independently, and on CPU its codes do not depend on the batch size or the
        number of frames: ATen runs the quantizer's 1x1 convolutions on oneDNN only for batches of two or
        more (a native kernel with other rounding for small single items), so one item is folded into two
        halves of its frames. ``stacked``: ``stacked_parameters()`` when the caller already has them.
        """
        in_w, in_b, codebook, out_w, out_b = stacked if stacked is not None else self.stacked_parameters()
        batch, _, frames = hidden_state.shape
        fold = batch == 1 and frames > 0 and _onednn_applies(hidden_state)
        if fold:
            half = (frames + 1) // 2
            padded = F.pad(hidden_state, (0, 2 * half - frames), mode="replicate")
            hidden_state = padded.view(-1, 2, half).transpose(0, 1)  # (2, D, half)
        normalized = derived_from(self, "_normalized_codebooks", [codebook], lambda: F.normalize(codebook, dim=-1))
        codes, quantized, latents = ops.rvq_encode(
            hidden_state, in_w, in_b, codebook, out_w, out_b, n_quantizers, mode=self.mode,
            normalized_codebook=normalized,
        )
        if fold:
            codes, quantized, latents = (t.transpose(0, 1).reshape(1, t.shape[1], 2 * half)[..., :frames]
                                         for t in (codes, quantized, latents))
        return codes, quantized, latents

    def _forward_inference(self, hidden_state: torch.Tensor, n_quantizers: int):
        stacked = self.stacked_parameters()
        codebook = stacked[2]
        codes, quantized, latents = self.encode_frames(hidden_state, n_quantizers, stacked)
        # The losses as the reference computes them: mean squared distance between each latent and its
        # codebook row, summed over codebooks, one value per batch item.
        batch = hidden_state.shape[0]
        d = codebook.shape[-1]
        commitment_loss = 0
        for i in range(n_quantizers):
            rows = F.embedding(codes[:, i], codebook[i]).transpose(1, 2)
            loss_i = F.mse_loss(latents[:, i * d : (i + 1) * d], rows, reduction="mean")
            commitment_loss = commitment_loss + loss_i * torch.ones(batch, dtype=torch.bool, device=codes.device)
        return quantized, codes, latents, commitment_loss, commitment_loss

    def _forward_reference(self, hidden_state: torch.Tensor, n_quantizers):
        quantized_representation = 0
        residual = hidden_state
        commitment_loss = 0
        codebook_loss = 0
        audio_codes = []
        projected_latents = []
        if self.training:
            n_quantizers = torch.ones((hidden_state.shape[0],)) * self.n_codebooks + 1
            dropout = torch.randint(1, self.n_codebooks + 1, (hidden_state.shape[0],))
            n_dropout = int(hidden_state.shape[0] * self.quantizer_dropout)
            n_quantizers[:n_dropout] = dropout[:n_dropout]
            n_quantizers = n_quantizers.to(hidden_state.device)
        for i, quantizer in enumerate(self.quantizers):
            if self.training is False and i >= n_quantizers:
                break
            quantized_i, commitment_loss_i, codebook_loss_i, indices_i, latents_i = quantizer(residual)
            mask = torch.full((hidden_state.shape[0],), i, device=hidden_state.device, dtype=torch.long) < n_quantizers
            quantized_representation = quantized_representation + quantized_i * mask[:, None, None]
            residual = residual - quantized_i
            commitment_loss += commitment_loss_i * mask
            codebook_loss += codebook_loss_i * mask
            audio_codes.append(indices_i)
            projected_latents.append(latents_i)
        audio_codes = torch.stack(audio_codes, dim=1)
        projected_latents = torch.cat(projected_latents, dim=1)
        return quantized_representation, audio_codes, projected_latents, commitment_loss, codebook_loss

    def from_codes(self, audio_codes: torch.Tensor):
        """codes (B, n, F) -> quantized (B, D, F), latents (B, n * d, F), codes."""
        n = audio_codes.shape[1]
        _, _, codebook, out_w, out_b = self.stacked_parameters()
        codebook, out_w, out_b = codebook[:n], out_w[:n], out_b[:n]
        quantized = ops.rvq_decode(audio_codes, codebook, out_w, out_b)
        latents = torch.cat([F.embedding(audio_codes[:, i], codebook[i]).transpose(1, 2) for i in range(n)], dim=1)
        return quantized, latents, audio_codes

    def from_latents(self, latents: torch.Tensor):
        """latents (B, n * d, F) -> quantized (B, D, F), quantized latents (B, n * d, F).

        Unlike transformers 5.x (issue #43819) the straight-through step detaches the quantization error,
        so gradients reach ``latents``.
        """
        d = self.quantizers[0].codebook_dim
        n = min(latents.shape[1] // d, self.n_codebooks)
        if n < 1:
            raise ValueError(f"latents must have at least {d} channels (one codebook), got shape {tuple(latents.shape)}")
        quantized_representation = 0
        quantized_latents = []
        for i in range(n):
            chunk = latents[:, i * d : (i + 1) * d, :]
            quantized_i, _ = self.quantizers[i].decode_latents(chunk)
            quantized_latents.append(quantized_i)
            with_ste = chunk + (quantized_i - chunk).detach()
            quantized_representation = quantized_representation + self.quantizers[i].out_proj(with_ste)
        return quantized_representation, torch.cat(quantized_latents, dim=1)


class DacDecoder(nn.Module):
    """Latent (B, D, F) -> audio (B, 1, F * hop_length)."""

    def __init__(self, config: DacConfig):
        super().__init__()
        channels = config.decoder_hidden_size
        self.conv1 = nn.Conv1d(config.hidden_size, channels, kernel_size=7, padding=3)
        self.block = nn.ModuleList(
            [DacDecoderBlock(config, stride, i) for i, stride in enumerate(config.upsampling_ratios)]
        )
        output_dim = channels // 2 ** len(config.upsampling_ratios)
        self.snake1 = Snake1d(output_dim)
        self.conv2 = nn.Conv1d(output_dim, 1, kernel_size=7, padding=3)
        self.tanh = nn.Tanh()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if _inference(hidden_state, self):
            return self.inference(hidden_state)
        hidden_state = conv_forward(self.conv1, hidden_state)
        for layer in self.block:
            hidden_state = layer(hidden_state)
        return self.tanh(conv_forward(self.conv2, self.snake1(hidden_state)))

    def inference(self, hidden_state: torch.Tensor, flow=None) -> torch.Tensor:
        """The fused inference structure; ``flow`` as in ``conv_step`` (None: offline)."""
        hidden_state = conv_step(self.conv1, hidden_state, flow)
        activated = self.block[0].snake1(hidden_state)
        for i, block in enumerate(self.block):
            units = (block.res_unit1, block.res_unit2, block.res_unit3)
            next_alpha = self.block[i + 1].snake1.alpha if i + 1 < len(self.block) else self.snake1.alpha
            upsampled = conv_transpose_step(block.conv_t1, activated, flow)
            activated = _residual_chain(units, upsampled, next_alpha, flow)
        return self.tanh(conv_step(self.conv2, activated, flow))


class DacEncoder(nn.Module):
    """Audio (B, 1, T) -> latent (B, D, T / hop_length)."""

    def __init__(self, config: DacConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(1, config.encoder_hidden_size, kernel_size=7, padding=3)
        self.block = nn.ModuleList(
            [DacEncoderBlock(config, stride=s, stride_index=i + 1) for i, s in enumerate(config.downsampling_ratios)]
        )
        d_model = config.encoder_hidden_size * 2 ** len(config.downsampling_ratios)
        self.snake1 = Snake1d(d_model)
        self.conv2 = nn.Conv1d(d_model, config.hidden_size, kernel_size=3, padding=1)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if _inference(hidden_state, self):
            return self.inference(hidden_state)
        hidden_state = conv_forward(self.conv1, hidden_state)
        for module in self.block:
            hidden_state = module(hidden_state)
        return conv_forward(self.conv2, self.snake1(hidden_state))

    def inference(self, hidden_state: torch.Tensor, flow=None) -> torch.Tensor:
        """The fused inference structure; ``flow`` as in ``conv_step`` (None: offline)."""
        hidden_state = conv_step(self.conv1, hidden_state, flow)
        for block in self.block:
            units = (block.res_unit1, block.res_unit2, block.res_unit3)
            hidden_state = conv_step(block.conv1, _residual_chain(units, hidden_state, block.snake1.alpha, flow), flow)
        return conv_step(self.conv2, self.snake1(hidden_state), flow)


# ----------------------------------------------------------------------------- time tiles
def encoder_reach(config: DacConfig) -> tuple[int, int]:
    """(left, right): encoder output frame f depends on input samples f * hop_length - left through
    f * hop_length + right, exactly (every layer is aligned: element t at a layer of r samples per element
    sits at sample t * r)."""
    left = right = 3  # conv1, k=7
    rate = 1  # input samples per element at the current level
    for s in config.downsampling_ratios:
        left += 3 * (1 + 3 + 9) * rate  # three residual units, k=7, dilations 1, 3, 9
        right += 3 * (1 + 3 + 9) * rate
        p = math.ceil(s / 2)
        # strided conv k=2s, padding p: output t reads inputs s*t - p .. s*t - p + 2s - 1
        left += p * rate
        right += (2 * s - 1 - p) * rate
        rate *= s
    return left + rate, right + rate  # conv2, k=3


def decoder_reach(config: DacConfig) -> tuple[int, int]:
    """(left, right): decoded sample i depends on the latent frames f with i - left <= f * hop_length <= i + right,
    exactly.
    ``right`` is the streaming decoder's delay in samples (``lookahead_samples``)."""
    rate = config.hop_length  # output samples per element at the current level
    left = right = 3 * rate  # conv1, k=7
    for s in config.upsampling_ratios:
        rate //= s
        p = math.ceil(s / 2)
        # transposed conv k=2s, padding p: output i reads inputs j with 0 <= i + p - s*j < 2s
        left += (2 * s - 1 - p) * rate + 3 * (1 + 3 + 9) * rate
        right += p * rate + 3 * (1 + 3 + 9) * rate
    return left + 3, right + 3  # conv2, k=7


def encoder_halo_frames(config: DacConfig) -> int:
    """Frames of context on each side beyond which an encoder output frame does not depend on its input."""
    return math.ceil(max(encoder_reach(config)) / config.hop_length) + 1


def decoder_halo_frames(config: DacConfig) -> int:
    """Latent frames of context on each side that a decoded sample depends on."""
    return math.ceil(max(decoder_reach(config)) / config.hop_length) + 1


def encoded_frames(config: DacConfig, n_samples: int) -> int:
    """Latent frames the encoder produces for ``n_samples`` (ceil-free: a partial hop may add or drop one).
    Also elementwise for an integer tensor of sample counts."""
    length = n_samples
    for s in config.downsampling_ratios:
        length = (length + 2 * math.ceil(s / 2) - 2 * s) // s + 1
    return length


def decoded_length(config: DacConfig, n_frames: int) -> int:
    """Samples the decoder produces for ``n_frames`` latent frames: n_frames * hop_length, less one sample per
    odd-stride transposed convolution (transformers and the original have no output_padding). Also
    elementwise for an integer tensor of frame counts."""
    length = n_frames
    for s in config.upsampling_ratios:
        length = (length - 1) * s - 2 * math.ceil(s / 2) + 2 * s
    return length


def _tile_plan(batch: int, n_frames: int, tile_frames: int, halo: int):
    """Split (batch, frames) work into pieces of about ``tile_frames`` item-frames.

    Yields (items, start, stop, context_start, context_stop): a slice of batch items and a frame range
    with its context. Short inputs are grouped several items to a piece; long ones go one item at a time
    in time tiles, so the largest activation stays near ``tile_frames`` frames whatever the batch size.
    """
    if batch * n_frames <= tile_frames:
        yield slice(0, batch), 0, n_frames, 0, n_frames
        return
    if n_frames <= tile_frames:
        group = max(1, tile_frames // n_frames)
        for b in range(0, batch, group):
            yield slice(b, min(batch, b + group)), 0, n_frames, 0, n_frames
        return
    for b in range(batch):
        for start in range(0, n_frames, tile_frames):
            stop = min(n_frames, start + tile_frames)
            yield slice(b, b + 1), start, stop, max(0, start - halo), min(n_frames, stop + halo)


def run_tiled(fn, inputs: torch.Tensor, n_frames: int, in_per_frame: int, out_per_frame: int, out_length: int,
              tile_frames: int, halo: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a time-equivariant network ``fn`` (B, C, n_frames * in_per_frame) -> (B, C', out_length) piece
    by piece (see ``_tile_plan``). ``halo`` frames of context beyond which outputs do not depend on inputs
    make each piece's kept outputs equal the whole computation's to rounding. Output sample k of a piece
    whose input starts at frame f is sample k + f * out_per_frame of the whole output. With ``lengths`` (B,)
    (valid input lengths of a right-padded batch) ``fn`` is called as fn(piece, the piece's valid lengths)."""
    out = None
    for items, start, stop, ctx_start, ctx_stop in _tile_plan(inputs.shape[0], n_frames, tile_frames, halo):
        # the last piece runs to the end of the input, so a partial last hop is seen as in the whole pass
        end = None if ctx_stop == n_frames else ctx_stop * in_per_frame
        piece = inputs[items, :, ctx_start * in_per_frame : end]
        if lengths is None:
            piece = fn(piece)
        else:
            piece = fn(piece, (lengths[items] - ctx_start * in_per_frame).clamp_min(0))
        if out is None:
            out = piece.new_empty(inputs.shape[0], piece.shape[1], out_length)
        width = min(stop * out_per_frame, out_length) - start * out_per_frame
        offset = (start - ctx_start) * out_per_frame
        out[items, :, start * out_per_frame : start * out_per_frame + width] = piece[..., offset : offset + width]
    return out


# ----------------------------------------------------------------------------- input checks
class DeviceChecks:
    """The data-dependent input checks of one encode/decode call, read back from the device together.

    Each check is a 0-d tensor computed where the input lives and a function of its Python value (that raises
    on bad input, or returns the value the caller needs). On CPU it runs at once (no device to wait for); on
    an accelerator ``run()`` brings all the queued values to the host in ONE transfer: that is the one host
    synchronisation encode/decode make for their input checks on CUDA (a separate ``.item()``, ``bool()`` or
    ``.tolist()`` per check would wait for the GPU each time). Error messages that quote values read them on
    the error path only. Under torch.compile/export ``require`` checks nothing (data-dependent: eager calls only)."""

    def __init__(self):
        self._pending = []

    def value(self, tensor: torch.Tensor, check=lambda v: v) -> list:
        """Queue ``check(tensor's value)``; the returned list holds its result once it has run."""
        result = []
        tensor = tensor.reshape(())
        if tensor.device.type == "cpu" or torch.compiler.is_compiling():
            result.append(check(tensor.item()))
        else:
            self._pending.append((tensor, check, result))
        return result

    def require(self, ok: torch.Tensor, message, error=ValueError) -> None:
        """Queue: raise ``error(message)`` unless ``ok`` (a 0-d bool tensor); ``message`` a string or a function
        returning one (called only to raise)."""
        if torch.compiler.is_compiling():
            return

        def check(value):
            if not value:
                raise error(message if isinstance(message, str) else message())

        self.value(ok, check)

    def run(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        device = pending[0][0].device
        # flags and small integers: exact in float32 (which every accelerator has)
        values = torch.stack([t.to(device, torch.float32) for t, _, _ in pending]).tolist()  # the one sync
        for value, (_, check, result) in zip(values, pending):
            result.append(check(value))


def _check_audio(input_values: torch.Tensor, checks: DeviceChecks) -> torch.Tensor:
    """The audio, checked (its values by ``checks``); integer PCM scaled to [-1, 1) as the feature extractor
    does."""
    if not isinstance(input_values, torch.Tensor):
        raise TypeError(f"input_values must be a torch.Tensor of shape (batch, 1, samples), got {type(input_values).__name__}")
    if input_values.dim() != 3 or input_values.shape[1] != 1:
        raise ValueError(
            f"input_values must have shape (batch, 1, samples) (mono audio), got {tuple(input_values.shape)}"
        )
    input_values = pcm_to_float(input_values, "input_values")
    if input_values.shape[0] == 0 or input_values.shape[-1] == 0:
        raise ValueError(f"input_values is empty: shape {tuple(input_values.shape)}")
    checks.require(torch.isfinite(input_values).all(), "input_values contains NaN or Inf samples")
    return input_values


class DacModel(nn.Module):
    """The DAC codec: encoder, residual vector quantizer, decoder.

    Drop-in for ``transformers.DacModel``: same config, parameter names, encode/decode/forward
    signatures and output classes.
    """

    main_input_name = "input_values"

    def __init__(self, config: DacConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.encoder = DacEncoder(config)
        self.decoder = DacDecoder(config)
        self.quantizer = DacResidualVectorQuantizer(config)
        self.bits_per_codebook = int(math.log2(config.codebook_size))
        self.backend = backend  # None: whatever ops is set to (DAC_FAST_BACKEND, or a backend() block)
        # Inference tiles in item-frames (None: per device). On CPU the tiles' buffers are recycled from
        # tile to tile (ops.cpu_buffer_cache) instead of page-faulted in anew.
        self.encode_tile_frames: int | None = None
        self.decode_tile_frames: int | None = None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """transformers' initialization (random weights; checkpoints overwrite them)."""
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, as transformers' ``num_parameters`` counts them (embeddings: the codebooks)."""
        embeddings = {id(m.weight) for m in self.modules() if exclude_embeddings and isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in embeddings and (p.requires_grad or not only_trainable))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _backend_scope(self):
        return ops.backend(self.backend) if self.backend else contextlib.nullcontext()

    # ------------------------------------------------------------------ checks
    def _check_n_quantizers(self, n_quantizers) -> int:
        n = self.config.n_codebooks
        if n_quantizers is None:
            return n
        if isinstance(n_quantizers, torch.Tensor) and n_quantizers.numel() == 1:
            n_quantizers = int(n_quantizers.item())
        problem = n_quantizers_problem(n_quantizers, n)
        if problem:
            raise ValueError(f"n_quantizers {problem}")
        return n_quantizers

    def _check_codes(self, audio_codes: torch.Tensor, checks: DeviceChecks | None = None) -> None:
        """Shape and dtype at once; the value range by ``checks`` (None: read now)."""
        if not isinstance(audio_codes, torch.Tensor) or audio_codes.dim() != 3:
            shape = tuple(audio_codes.shape) if isinstance(audio_codes, torch.Tensor) else type(audio_codes).__name__
            raise ValueError(f"audio_codes must be a tensor of shape (batch, n_codebooks, frames), got {shape}")
        if audio_codes.is_floating_point() or audio_codes.is_complex() or audio_codes.dtype == torch.bool:
            raise TypeError(f"audio_codes must be an integer tensor, got dtype {audio_codes.dtype}")
        n = audio_codes.shape[1]
        if not 1 <= n <= self.config.n_codebooks:
            raise ValueError(f"audio_codes has {n} codebooks; this model has {self.config.n_codebooks}")
        if audio_codes.numel() == 0:
            raise ValueError(f"audio_codes is empty: shape {tuple(audio_codes.shape)}")
        if torch.compiler.is_compiling():  # the value range is data-dependent: checked in eager calls only
            return
        size = self.config.codebook_size
        lo, hi = torch.aminmax(audio_codes)
        queue = DeviceChecks() if checks is None else checks
        queue.require((lo >= 0) & (hi < size),
                      lambda: f"audio_codes must lie in [0, {size}), got values in [{lo.item()}, {hi.item()}]")
        if checks is None:
            queue.run()

    def _tile_frames(self, requested: int | None, default: int | None, inputs: torch.Tensor, net: nn.Module):
        """Item-frames per tile, or None to run untiled (autograd needs the whole graph)."""
        tile = default if requested is None else requested
        if tile is None:
            # CPU: 384 frames measured best across allocator settings with the buffer cache
            # (benchmarks/bench_tiles.py, RESULTS.md)
            tile = (16384 if net is self.encoder else 8192) if inputs.is_cuda else 384
        if not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile_frames must be a positive number of frames, got {tile!r}")
        return None if _needs_graph(net, inputs) else tile

    def _graphed(self, name: str, net: nn.Module, inputs: torch.Tensor, cuda_graphs):
        """For ``cuda_graphs=True``: a wrapper that makes a tile function of ``net`` replay CUDA graphs, one per
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
        if self.training or _needs_graph(net, inputs):
            raise ValueError("cuda_graphs=True runs inference only: call model.eval() and encode/decode under "
                             "torch.inference_mode() or torch.no_grad()")
        if inputs.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model and its inputs on a CUDA device, got {inputs.device}; "
                             "use cuda_graphs=False here")
        if torch.compiler.is_compiling():
            raise ValueError("cuda_graphs=True cannot run under torch.compile (its mode='reduce-overhead' "
                             "captures CUDA graphs itself)")
        # inference-tensor weights: versions not tracked, nothing can be kept (eager tiles)
        cache = derived_from(self, "graphs", list(self.parameters()), cuda_graphs_module.GraphCache,
                             store=cuda_graphs_module.MODEL_GRAPHS.setdefault(self, {}), untracked=lambda: None)
        if cache is None:
            return lambda fn: fn
        return cache.wrapper(name, cuda_graphs_module.kernel_settings(self.backend))

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        input_values: torch.Tensor,
        n_quantizers: int | None = None,
        return_dict: bool | None = None,
        tile_frames: int | None = None,
        padding_mask: torch.Tensor | None = None,
        cuda_graphs: bool = False,
    ):
        """Encode audio (B, 1, T) into codes.

        Returns ``DacEncoderOutput(loss (B,), quantized_representation (B, D, F), audio_codes (B, n, F),
        projected_latents (B, n * d, F))`` or that tuple. In inference (no autograd), inputs of more than
        ``tile_frames`` frames (default ``self.encode_tile_frames``) run in time tiles with enough context
        that the codes equal the untiled ones; 0 < tile_frames; pass a large value to disable. Integer PCM is
        scaled to [-1, 1); audio shorter than the encoder's strided convolutions need is zero-padded to one
        hop (one frame of codes), where transformers raises a convolution error.

        ``padding_mask`` (B, T), 1 for real samples then 0 for right padding (as ``DacFeatureExtractor(...,
        padding=True)`` returns it; inference only): each item is encoded as if alone and unpadded. Its codes
        over its own frames equal encoding it alone, and the output gains ``audio_frames`` (B,), the number of
        frames of each item (the frames after those are padding); pass it to ``decode(..., audio_frames=)``.

        ``cuda_graphs=True`` (CUDA, inference only): the encoder's tiles replay CUDA graphs captured on first
        use (see ``_graphed``); the codes are identical to ``cuda_graphs=False``.
        """
        checks = DeviceChecks()
        input_values = _check_audio(input_values, checks).to(self.dtype)  # float64 numpy audio, or fp32 audio into a bf16 model
        queued_n_quantizers = None
        if isinstance(n_quantizers, torch.Tensor) and n_quantizers.numel() == 1:
            queued_n_quantizers = checks.value(n_quantizers, int)  # its value is read with the other checks
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        graphs = self._graphed("encoder", self.encoder, input_values, cuda_graphs)
        lengths = audio_frames = None
        if padding_mask is not None:
            lengths = self._check_padding_mask(padding_mask, input_values, checks)
        checks.run()
        n_quantizers = self._check_n_quantizers(n_quantizers if queued_n_quantizers is None else queued_n_quantizers[0])
        if padding_mask is not None:
            # padding is zero whatever the caller put there; an item too short for the encoder is zero-padded
            # to one hop, as it is when encoded alone
            input_values = zero_outside(input_values, 0, stop=lengths)
            hop = self.config.hop_length
            lengths = torch.where(encoded_frames(self.config, lengths) < 1, torch.full_like(lengths, hop), lengths)
            audio_frames = encoded_frames(self.config, lengths)
        with self._backend_scope():
            latent = self._encode_latent(input_values, tile_frames, lengths, graphs)
            quantized, codes, latents, commitment_loss, codebook_loss = self.quantizer(latent, n_quantizers)
        loss = self.config.commitment_loss_weight * commitment_loss + self.config.codebook_loss_weight * codebook_loss
        if not return_dict:
            return (loss, quantized, codes, latents) + (() if audio_frames is None else (audio_frames,))
        return DacEncoderOutput(loss, quantized, codes, latents, audio_frames)

    def _encode_latent(self, input_values: torch.Tensor, tile_frames: int | None,
                       lengths: torch.Tensor | None = None, graphs=None) -> torch.Tensor:
        """``graphs``: ``_graphed``'s wrapper, or None (eager)."""
        hop = self.config.hop_length
        length = input_values.shape[-1]
        tile = self._tile_frames(tile_frames, self.encode_tile_frames, input_values, self.encoder)
        n_frames = encoded_frames(self.config, length)
        if n_frames < 1:
            # Too short for the strided convolutions: zero-pad to one hop, as the CLI pads every file to whole hops.
            input_values = F.pad(input_values, (0, hop - length))
            n_frames = encoded_frames(self.config, hop)
        encoder = self.encoder if lengths is None else lambda x, valid: self.encoder.inference(x, PaddedBatch(valid))
        if tile is None:
            return encoder(input_values) if lengths is None else encoder(input_values, lengths)
        if graphs is not None:
            encoder = graphs(encoder)
        with ops.cpu_buffer_cache(input_values):
            return run_tiled(encoder, input_values, n_frames, hop, 1, n_frames, tile,
                             encoder_halo_frames(self.config), lengths)

    def _check_padding_mask(self, padding_mask, input_values: torch.Tensor, checks: DeviceChecks) -> torch.Tensor:
        """Valid lengths (B,) of a right-padding mask (B, T) for ``input_values`` (B, 1, T); its values are checked
        by ``checks``."""
        shape = (input_values.shape[0], input_values.shape[-1])
        if not isinstance(padding_mask, torch.Tensor) or tuple(padding_mask.shape) != shape:
            got = tuple(padding_mask.shape) if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
            raise ValueError(f"padding_mask must be a tensor of shape (batch, samples) = {shape}, got {got}")
        if _needs_graph(self.encoder, input_values) or self.training:
            raise ValueError("padding_mask is supported in inference only (eval mode, no autograd)")
        mask = padding_mask.to(input_values.device)
        checks.require(((mask == 0) | (mask == 1)).all(), "padding_mask must hold only 0 (padding) and 1 (real samples)")
        mask = mask.bool()
        lengths = mask.sum(-1)
        checks.require((mask == (torch.arange(shape[1], device=mask.device) < lengths.unsqueeze(1))).all(),
                       "padding_mask must mark right padding: ones for each item's samples, then zeros")
        checks.require((lengths > 0).all(), lambda: "padding_mask gives an item no samples "
                       f"(items {lengths.eq(0).nonzero().flatten().tolist()})")
        return lengths

    # ------------------------------------------------------------------ decode
    def decode(
        self,
        quantized_representation: torch.Tensor | None = None,
        audio_codes: torch.Tensor | None = None,
        return_dict: bool | None = None,
        tile_frames: int | None = None,
        audio_frames: torch.Tensor | None = None,
        cuda_graphs: bool = False,
    ):
        """Decode a quantized representation (B, D, F), or codes (B, n, F) which take precedence, into
        ``DacDecoderOutput(audio_values (B, F * hop_length))``. Tiled in inference like ``encode``.

        ``audio_frames`` (B,), frames of each item (``encode(..., padding_mask=)`` returns them; inference
        only): each item is decoded as if alone with its own frames; its samples after
        ``decoded_length(config, audio_frames[b])`` are zero.

        ``cuda_graphs=True`` (CUDA, inference only): the decoder's tiles replay CUDA graphs captured on first
        use (see ``_graphed``); the audio equals ``cuda_graphs=False``'s."""
        if quantized_representation is None and audio_codes is None:
            raise ValueError("Either `quantized_representation` or `audio_codes` must be provided.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        checks = DeviceChecks()
        with self._backend_scope():
            if audio_codes is not None:
                self._check_codes(audio_codes, checks)
                source = audio_codes
            else:
                self._check_latent(quantized_representation)
                source = quantized_representation
            graphs = self._graphed("decoder", self.decoder, source, cuda_graphs)
            lengths = None
            if audio_frames is not None:
                lengths = self._check_audio_frames(audio_frames, source, checks)
            checks.run()
            if audio_codes is not None:
                quantized_representation = self.quantizer.from_codes(audio_codes)[0]
            audio_values = self._decode_latent(quantized_representation, tile_frames, lengths, graphs).squeeze(1)
            if lengths is not None:
                audio_values = zero_outside(audio_values.unsqueeze(1), 0, stop=decoded_length(self.config, lengths))
                audio_values = audio_values.squeeze(1)
        if not return_dict:
            return (audio_values,)
        return DacDecoderOutput(audio_values)

    def _check_latent(self, z: torch.Tensor) -> None:
        d = self.config.hidden_size
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[1] != d:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"quantized_representation must have shape (batch, {d}, frames), got {shape}")
        if not z.is_floating_point():
            raise TypeError(f"quantized_representation must be floating point, got dtype {z.dtype}")

    def _check_audio_frames(self, audio_frames, z: torch.Tensor, checks: DeviceChecks) -> torch.Tensor:
        """Frame counts (B,) for the latent or codes ``z`` (B, ., F); their values are checked by ``checks``."""
        batch, frames = z.shape[0], z.shape[-1]
        if not isinstance(audio_frames, torch.Tensor) or tuple(audio_frames.shape) != (batch,) \
                or audio_frames.is_floating_point() or audio_frames.dtype == torch.bool:
            got = (f"{tuple(audio_frames.shape)} {audio_frames.dtype}" if isinstance(audio_frames, torch.Tensor)
                   else type(audio_frames).__name__)
            raise ValueError(f"audio_frames must be an integer tensor of shape ({batch},), got {got}")
        if _needs_graph(self.decoder, z) or self.training:
            raise ValueError("audio_frames is supported in inference only (eval mode, no autograd)")
        lengths = audio_frames.to(z.device)
        checks.require(((lengths >= 1) & (lengths <= frames)).all(),
                       lambda: f"audio_frames must lie in [1, {frames}], got {audio_frames.tolist()}")
        return lengths

    def _decode_latent(self, z: torch.Tensor, tile_frames: int | None, lengths: torch.Tensor | None = None,
                       graphs=None):
        """``graphs``: ``_graphed``'s wrapper, or None (eager)."""
        tile = self._tile_frames(tile_frames, self.decode_tile_frames, z, self.decoder)
        decoder = self.decoder if lengths is None else lambda x, valid: self.decoder.inference(x, PaddedBatch(valid))
        if tile is None:
            return decoder(z) if lengths is None else decoder(z, lengths)
        if graphs is not None:
            decoder = graphs(decoder)
        n_frames = z.shape[-1]
        with ops.cpu_buffer_cache(z):
            return run_tiled(decoder, z, n_frames, 1, self.config.hop_length,
                             decoded_length(self.config, n_frames), tile, decoder_halo_frames(self.config), lengths)

    # ------------------------------------------------------------------ streaming
    # ------------------------------------------------------------------ weight-derived caches
    def clear_weight_caches(self) -> None:
        """Drop everything built from the weights: polyphase and packed convolution weights, stacked and
        normalized codebooks, captured CUDA graphs (rebuilt on next use). Changes made through the parameters
        (in place under no_grad, ``load_state_dict``, ``.to()``) are seen without it; updates through ``.data``
        bump no version counter, so call it after those. ``.to()``, ``.half()``, ``.cuda()`` ... call it first,
        so no copy of the old weights outlives the move."""
        for module in self.modules():
            module.__dict__.pop("_derived", None)
            _PACKED_WEIGHTS.pop(module, None)
        cuda_graphs_module.MODEL_GRAPHS.pop(self, None)

    def _apply(self, fn, *args, **kwargs):
        self.clear_weight_caches()
        return super()._apply(fn, *args, **kwargs)

    def streaming_decoder(self, batch_size: int = 1, cuda_graphs: bool = False):
        """A ``dac_fast.streaming.StreamingDecoder`` for ``batch_size`` independent code streams:
        ``push(codes (B, n, f))`` returns the samples now final, ``flush()`` the rest; their concatenation
        equals ``decode(audio_codes=whole)`` to fp32 rounding. ``lookahead_frames``: frames needed after a
        frame before all its samples are returned. ``cuda_graphs=True`` (model on CUDA): steady-state pushes
        of a repeated size replay a CUDA graph of the decoder step (``streaming._StepGraphs``); the audio
        equals the eager stream's."""
        from .streaming import StreamingDecoder

        return StreamingDecoder(self, batch_size, cuda_graphs)

    def streaming_encoder(self, batch_size: int = 1, n_quantizers: int | None = None):
        """A ``dac_fast.streaming.StreamingEncoder``: ``push(audio (B, 1, s))`` returns the codes of the frames
        now final, ``flush()`` the rest; together identical to ``encode(whole).audio_codes``."""
        from .streaming import StreamingEncoder

        return StreamingEncoder(self, batch_size, n_quantizers)

    # ------------------------------------------------------------------ forward
    def forward(self, input_values: torch.Tensor, n_quantizers: int | None = None, return_dict: bool | None = None):
        """Encode then decode (B, 1, T). Returns ``DacOutput(loss, audio_values (B, T), quantized_representation,
        audio_codes, projected_latents)`` or that tuple."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        length = input_values.shape[-1]
        loss, quantized, codes, latents = self.encode(input_values, n_quantizers, return_dict=False)
        audio_values = self.decode(quantized, return_dict=False)[0][..., :length]
        if not return_dict:
            return (loss, audio_values, quantized, codes, latents)
        return DacOutput(loss, audio_values, quantized, codes, latents)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path_or_id, *, device=None, dtype=None, torch_dtype=None, device_map=None, backend=None,
                        **hub_kwargs) -> "DacModel":
        """Load a transformers-format checkpoint: a local directory (config.json + model.safetensors or
        pytorch_model.bin) or a hub id (local Hugging Face cache, or huggingface_hub when reachable).

        dtype (or transformers' older ``torch_dtype``): a torch.dtype, its name, or "auto" (the checkpoint's);
        device or transformers' ``device_map`` ("auto", a device, or {"": device}: the model is never split);
        hub_kwargs: revision, cache_dir, local_files_only, token, force_download, proxies. Other keyword
        arguments raise a TypeError."""
        from .loading import load_pretrained

        return load_pretrained(cls, path_or_id, device=device, dtype=dtype, torch_dtype=torch_dtype,
                               device_map=device_map, backend=backend, **hub_kwargs)

    @classmethod
    def from_original(cls, path, *, device=None, dtype=None, backend=None) -> "DacModel":
        """Load an original descript-audio-codec ``.pth`` checkpoint (weight-norm pairs folded at load)."""
        from .loading import load_original

        return load_original(cls, path, device=device, dtype=dtype, backend=backend)

    @classmethod
    def from_transformers(cls, hf_model, *, backend=None) -> "DacModel":
        """Convert an in-memory ``transformers.DacModel`` (weights copied, same device and dtype)."""
        from .loading import convert_transformers

        return convert_transformers(cls, hf_model, backend=backend)

    @classmethod
    def from_preset(cls, name: str, *, seed: int = 0, device=None, dtype=None, backend=None) -> "DacModel":
        """A model in the real shapes of preset ``name`` with seeded RANDOM weights (for tests and demos:
        it does not produce meaningful audio)."""
        from .loading import randomize_

        # ordinary tensors even inside inference_mode, as the loaders make (their weight caches track versions)
        with torch.inference_mode(False):
            model = cls(DacConfig.from_preset(name), backend=backend)
            randomize_(model, seed)
            return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory) -> None:
        """Write config.json, model.safetensors and preprocessor_config.json, loadable by transformers."""
        from .loading import save_pretrained

        save_pretrained(self, directory)

    # ------------------------------------------------------------------ weight norm (training)
    def _weight_norm_modules(self):
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                yield module

    def apply_weight_norm(self) -> None:
        """Reparametrize every convolution as g * v / ||v|| (dim 0), as in the original training setup."""
        for module in self._weight_norm_modules():
            nn.utils.parametrizations.weight_norm(module)

    def remove_weight_norm(self) -> None:
        """Fold weight-norm parametrizations back into plain weights."""
        for module in self._weight_norm_modules():
            if nn.utils.parametrize.is_parametrized(module, "weight"):
                nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
