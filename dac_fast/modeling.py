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

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import buffer_cache, ops
from .configuration import DacConfig
from .checks import (
    DeviceChecks,
    check_audio,
    check_audio_frames,
    check_codes,
    check_latent,
    check_n_quantizers,
    check_padding_mask,
)
from .cuda_graphs import tile_graphs
from .convolution import (
    PaddedBatch,
    conv_forward,
    conv_step,
    conv_transpose_step,
    onednn_applies,
    weight_norm_parts,
    zero_outside,
)
from .outputs import DacDecoderOutput, DacEncoderOutput, DacOutput
from .pretrained import DacPreTrainedModel, run_block
from .streaming import StreamingDecoder, StreamingEncoder
from .tiles import decoded_length, decoder_halo_frames, encoded_frames, encoder_halo_frames, run_tiled, tile_frames_for
from .weight_cache import derived_from


class Snake1d(nn.Module):
    """Snake activation with a learned per-channel ``alpha`` of shape (1, C, 1)."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, hidden_dim, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        return ops.snake(hidden_states, self.alpha)


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
        fold = batch == 1 and frames > 0 and onednn_applies(hidden_state)
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
            hidden_state = run_block(layer, hidden_state)
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
            hidden_state = run_block(module, hidden_state)
        return conv_forward(self.conv2, self.snake1(hidden_state))

    def inference(self, hidden_state: torch.Tensor, flow=None) -> torch.Tensor:
        """The fused inference structure; ``flow`` as in ``conv_step`` (None: offline)."""
        hidden_state = conv_step(self.conv1, hidden_state, flow)
        for block in self.block:
            units = (block.res_unit1, block.res_unit2, block.res_unit3)
            hidden_state = conv_step(block.conv1, _residual_chain(units, hidden_state, block.snake1.alpha, flow), flow)
        return conv_step(self.conv2, self.snake1(hidden_state), flow)


class DacModel(DacPreTrainedModel):
    """The DAC codec: encoder, residual vector quantizer, decoder.

    Drop-in for ``transformers.DacModel``: same config, parameter names, encode/decode/forward
    signatures and output classes. transformers' model conveniences (``num_parameters``, gradient
    checkpointing, ``push_to_hub``, loading and saving, ...) come from ``DacPreTrainedModel``.
    """

    def __init__(self, config: DacConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.encoder = DacEncoder(config)
        self.decoder = DacDecoder(config)
        self.quantizer = DacResidualVectorQuantizer(config)
        self.bits_per_codebook = int(math.log2(config.codebook_size))
        self.backend = backend  # None: whatever ops is set to (DAC_FAST_BACKEND, or a backend() block)
        # Inference tiles in item-frames (None: per device). On CPU the tiles' buffers are recycled from
        # tile to tile (buffer_cache.cpu_buffer_cache) instead of page-faulted in anew.
        self.encode_tile_frames: int | None = None
        self.decode_tile_frames: int | None = None
        self._init_weights()

    def _backend_scope(self):
        return ops.backend(self.backend) if self.backend else contextlib.nullcontext()

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
        padding=True)`` returns it; inference only): each item is encoded as the feature extractor gives it
        alone, zero-padded to whole hops (``ceil(n / hop_length)`` frames). Its codes over its own frames equal
        that single-clip path's, and the output gains ``audio_frames`` (B,), the number of frames of each item
        (the frames after those are padding); pass it to ``decode(..., audio_frames=)``.

        ``cuda_graphs=True`` (CUDA, inference only): the encoder's tiles replay CUDA graphs captured on first
        use (see ``cuda_graphs.tile_graphs``); the codes are identical to ``cuda_graphs=False``.
        """
        checks = DeviceChecks()
        input_values = check_audio(input_values, checks).to(self.dtype)  # float64 numpy audio, or fp32 audio into a bf16 model
        queued_n_quantizers = None
        if isinstance(n_quantizers, torch.Tensor) and n_quantizers.numel() == 1:
            queued_n_quantizers = checks.value(n_quantizers, int)  # its value is read with the other checks
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inference = _inference(input_values, self.encoder)
        graphs = tile_graphs(self, "encoder", input_values, cuda_graphs, inference)
        lengths = audio_frames = None
        if padding_mask is not None:
            lengths = check_padding_mask(padding_mask, input_values, checks, inference)
        checks.run()
        n_quantizers = check_n_quantizers(n_quantizers if queued_n_quantizers is None else queued_n_quantizers[0],
                                          self.config.n_codebooks)
        if padding_mask is not None:
            # Each item as the feature extractor gives it alone: zero-padded to whole hops (whatever the caller
            # put in its padding), so a padded batch and the single-clip path give the same codes and frames.
            hop = self.config.hop_length
            input_values = F.pad(zero_outside(input_values, 0, stop=lengths), (0, -input_values.shape[-1] % hop))
            lengths = (lengths + hop - 1) // hop * hop
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
        """``graphs``: ``cuda_graphs.tile_graphs``'s wrapper, or None (eager)."""
        hop = self.config.hop_length
        length = input_values.shape[-1]
        tile = tile_frames_for("encoder", input_values, tile_frames, self.encode_tile_frames)
        tile = None if _needs_graph(self.encoder, input_values) else tile  # autograd needs the whole graph
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
        with buffer_cache.cpu_buffer_cache(input_values):
            return run_tiled(encoder, input_values, n_frames, hop, 1, n_frames, tile,
                             encoder_halo_frames(self.config), lengths)

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
        use (see ``cuda_graphs.tile_graphs``); the audio equals ``cuda_graphs=False``'s."""
        if quantized_representation is None and audio_codes is None:
            raise ValueError("Either `quantized_representation` or `audio_codes` must be provided.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        checks = DeviceChecks()
        with self._backend_scope():
            if audio_codes is not None:
                audio_codes = source = check_codes(audio_codes, self.config, checks)
            else:
                check_latent(quantized_representation, self.config.hidden_size)
                source = quantized_representation
            inference = _inference(source, self.decoder)
            graphs = tile_graphs(self, "decoder", source, cuda_graphs, inference)
            lengths = None
            if audio_frames is not None:
                lengths = check_audio_frames(audio_frames, source, checks, inference)
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

    def _decode_latent(self, z: torch.Tensor, tile_frames: int | None, lengths: torch.Tensor | None = None,
                       graphs=None):
        """``graphs``: ``cuda_graphs.tile_graphs``'s wrapper, or None (eager)."""
        tile = tile_frames_for("decoder", z, tile_frames, self.decode_tile_frames)
        tile = None if _needs_graph(self.decoder, z) else tile  # autograd needs the whole graph
        decoder = self.decoder if lengths is None else lambda x, valid: self.decoder.inference(x, PaddedBatch(valid))
        if tile is None:
            return decoder(z) if lengths is None else decoder(z, lengths)
        if graphs is not None:
            decoder = graphs(decoder)
        n_frames = z.shape[-1]
        with buffer_cache.cpu_buffer_cache(z):
            return run_tiled(decoder, z, n_frames, 1, self.config.hop_length,
                             decoded_length(self.config, n_frames), tile, decoder_halo_frames(self.config), lengths)

    def streaming_decoder(self, batch_size: int = 1, cuda_graphs: bool = False):
        """A ``dac_fast.streaming.StreamingDecoder`` for ``batch_size`` independent code streams:
        ``push(codes (B, n, f))`` returns the samples now final, ``flush()`` the rest; their concatenation
        equals ``decode(audio_codes=whole)`` to fp32 rounding. ``lookahead_frames``: frames needed after a
        frame before all its samples are returned. ``cuda_graphs=True`` (model on CUDA): steady-state pushes
        of a repeated size replay a CUDA graph of the decoder step (``cuda_graphs.StepGraphs``); the audio
        equals the eager stream's."""
        return StreamingDecoder(self, batch_size, cuda_graphs)

    def streaming_encoder(self, batch_size: int = 1, n_quantizers: int | None = None):
        """A ``dac_fast.streaming.StreamingEncoder``: ``push(audio (B, 1, s))`` returns the codes of the frames
        now final, ``flush()`` the rest; together identical to ``encode(whole).audio_codes``."""
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
