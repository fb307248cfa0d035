"""Receptive fields of the encoder and decoder, the frame/sample arithmetic they imply, and exact time tiles:
long inputs run piece by piece with enough context that every kept output equals the whole pass's."""

from __future__ import annotations

import math

import torch

from .checks import check_tile_frames
from .configuration import DacConfig


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


# Item-frames per tile when the model's attribute and the call leave it open. CPU: 384 measured best across
# allocator settings with the buffer cache (benchmarks/bench_tiles.py, RESULTS.md); CUDA: large, to fill the GPU.
DEFAULT_TILE_FRAMES = {("cpu", "encoder"): 384, ("cpu", "decoder"): 384,
                       ("cuda", "encoder"): 16384, ("cuda", "decoder"): 8192}


def tile_frames_for(network: str, inputs: torch.Tensor, requested: int | None, default: int | None) -> int:
    """Item-frames per tile for ``network`` ("encoder" or "decoder"): the call's ``requested`` value, else the
    model's ``default`` attribute, else ``DEFAULT_TILE_FRAMES`` for the inputs' device."""
    tile = default if requested is None else requested
    if tile is None:
        tile = DEFAULT_TILE_FRAMES[("cuda" if inputs.is_cuda else "cpu", network)]
    return check_tile_frames(tile)
