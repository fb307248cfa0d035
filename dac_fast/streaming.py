"""Exact streaming encode and decode: B independent streams through the model's own inference forwards.

DAC is not causal: a decoded sample depends on latent frames on both sides. The streaming objects here keep,
for each layer, exactly the state the next input needs, so each input element passes through each layer
once and what they return equals the offline computation:

- each convolution keeps its left context (the last (k - 1) * dilation inputs), prefilled with the layer's
  own left zero padding; ``flush`` feeds it its right zero padding;
- each transposed convolution runs in the polyphase form (``conv_transpose_inner_frames``), a 2-tap
  convolution over input frames, so its state is one frame; the first and last ``padding`` samples are cropped as
  offline;
- each residual unit's skip input waits until its branch (delayed by conv1's right context) catches up.

The state lives in a ``LayerStreams`` keyed by module name and owned by the streaming object, so several
streaming objects can drive one model at once. ``DacEncoder.inference`` / ``DacDecoder.inference`` take it
as their ``flow`` (see ``convolution.conv_step``); offline they run with ``flow=None``.

Exactness: the decoder's concatenated output equals ``model.decode(audio_codes=whole).audio_values`` to fp32
rounding (max abs difference below 1e-5: its large convolutions run on packed weights, see
``convolution.packed_conv1d``, whose bits differ from the offline path's at rounding level); the encoder's codes are
identical to ``model.encode(whole).audio_codes`` on CPU in fp32 (oneDNN convolutions give every element the
same bits whatever window it is computed in; see ``convolution.conv_arithmetic``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .checks import check_codes, check_n_quantizers, check_stream_samples
from .convolution import conv_arithmetic, conv_transpose_inner_frames, zero_outside
from .tiles import decoder_reach, encoded_frames, encoder_reach
from .cuda_graphs import StepGraphs, capture_cuda_graph


class LayerStreams:
    """Per-layer state of ``batch_size`` streams advancing in lockstep through one network (``root``).

    ``elements_per_frame[name]``: input elements per latent frame of the layer ``name`` (used to place a
    restarted stream's start at each layer). ``starts`` (B,): the frame at which each stream's current
    request began (None until a stream is restarted alone); inputs before it are zeroed at every layer, which
    is the zero padding that request would see alone. ``packed``: the large convolutions run on weights packed
    once (``convolution.packed_conv1d``: faster for short windows, equal to the offline bits only to rounding).
    """

    def __init__(self, root: nn.Module, batch_size: int, elements_per_frame: dict[str, int], packed: bool = False):
        self.packed = packed
        self.names = {module: name for name, module in root.named_modules()}
        self.batch_size = batch_size
        self.elements_per_frame = elements_per_frame
        self.context: dict[str, torch.Tensor] = {}  # layer input kept for the next step
        self.position: dict[str, int] = {}  # position of context[name][..., 0] in the layer's input
        self.to_crop: dict[str, int] = {}  # transposed convolutions: leading output samples still to drop
        self.starts: torch.Tensor | None = None
        self.final = False  # set for the flush step: every layer appends its right zero padding

    def restart(self, mask: torch.Tensor, frame: int) -> None:
        """The streams in ``mask`` (B,) begin a new request at latent frame ``frame``."""
        starts = self.starts if self.starts is not None else torch.zeros(self.batch_size, dtype=torch.long)
        self.starts = torch.where(mask, frame, starts)

    def settle(self, outputs_done: bool) -> None:
        """Forget the restart points once they no longer matter: every layer's kept input begins at or after the
        latest restart (so no window holds anything to zero) and ``outputs_done`` (the caller has returned
        everything before it). Pushes then run unmasked again (and a CUDA-graph step may replay)."""
        if self.starts is None or not outputs_done:
            return
        latest = int(self.starts.max())
        if all(self.position.get(name, -1) >= latest * rate for name, rate in self.elements_per_frame.items()):
            self.starts = None

    def _window(self, name: str, hidden_state: torch.Tensor, left: int, right: int) -> torch.Tensor:
        """[kept context | new input | right padding if final], zeroed before each stream's start."""
        if name not in self.context:
            self.context[name] = hidden_state.new_zeros(hidden_state.shape[0], hidden_state.shape[1], left)
            self.position[name] = -left
        parts = [self.context[name], hidden_state]
        if self.final:
            parts.append(hidden_state.new_zeros(hidden_state.shape[0], hidden_state.shape[1], right))
        window = torch.cat(parts, dim=-1)
        if self.starts is not None:
            start = (self.starts * self.elements_per_frame[name]).to(window.device)
            window = zero_outside(window, self.position[name], start=start)
        return window

    def _advance(self, name: str, window: torch.Tensor, consumed: int) -> None:
        self.context[name] = window[..., consumed:].contiguous()
        self.position[name] += consumed

    def conv(self, conv: nn.Conv1d, hidden_state: torch.Tensor) -> torch.Tensor:
        name = self.names[conv]
        (k,), (s,), (d,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        window = self._window(name, hidden_state, p, p)
        span = (k - 1) * d + 1
        n_out = max(0, (window.shape[-1] - span) // s + 1)
        self._advance(name, window, n_out * s)
        if n_out == 0:
            return window.new_empty(window.shape[0], conv.out_channels, 0)
        return conv_arithmetic(conv, window, 0, packed=self.packed)

    def conv_transpose(self, conv: nn.ConvTranspose1d, hidden_state: torch.Tensor) -> torch.Tensor:
        name = self.names[conv]
        p = conv.padding[0]
        window = self._window(name, hidden_state, 1, 1)
        frames = window.shape[-1]
        self._advance(name, window, frames - 1)
        if frames < 2:
            return window.new_empty(window.shape[0], conv.out_channels, 0)
        # phase frames 1 .. frames - 1 of the window: each needs two real frames
        out = conv_transpose_inner_frames(conv, window, packed=self.packed)
        crop = min(self.to_crop.setdefault(name, p), out.shape[-1])
        self.to_crop[name] -= crop
        out = out[..., crop:]
        return out[..., : out.shape[-1] - p] if self.final else out

    def skip(self, unit: nn.Module, hidden_state: torch.Tensor, length: int) -> torch.Tensor:
        """The residual input aligned with the ``length`` branch outputs just computed."""
        name = self.names[unit]
        pending = torch.cat([self.context.get(name, hidden_state[..., :0]), hidden_state], dim=-1)
        self.context[name] = pending[..., length:].contiguous()
        return pending[..., :length]


def _check_streams(streams, batch_size: int) -> torch.Tensor:
    """A bool mask (B,) from a bool mask or a list/tensor of stream indices."""
    if isinstance(streams, int):
        streams = [streams]
    mask = torch.as_tensor(streams)
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (batch_size,):
            raise ValueError(f"streams as a bool mask must have shape ({batch_size},), got {tuple(mask.shape)}")
        return mask
    if mask.is_floating_point() or mask.dim() > 1:
        raise ValueError(f"streams must be a bool mask of shape ({batch_size},) or stream indices, got {streams!r}")
    mask = mask.flatten().long()
    if ((mask < 0) | (mask >= batch_size)).any():
        raise ValueError(f"stream indices must lie in [0, {batch_size}), got {mask.tolist()}")
    out = torch.zeros(batch_size, dtype=torch.bool)
    out[mask] = True
    return out


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class StreamingDecoder:
    """Decode ``batch_size`` independent code streams as their frames arrive; see ``DacModel.streaming_decoder``."""

    def __init__(self, model, batch_size: int = 1, cuda_graphs: bool = False):
        self.model = model
        self.config = model.config
        self.batch_size = _check_batch_size(batch_size)
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, got {model.device}; "
                             "use cuda_graphs=False here")
        self._graphs = StepGraphs(capture_cuda_graph) if cuda_graphs else None  # see cuda_graphs.StepGraphs
        left, right = decoder_reach(self.config)
        # sample i is final once the frames at positions up to i + right are in
        self.lookahead_samples = right
        self.lookahead_frames = math.ceil(right / self.config.hop_length)
        self.reset()

    def _layer_rates(self) -> dict[str, int]:
        """Input elements per latent frame of every layer that keeps state."""
        rates = {}
        rate = 1
        decoder = self.model.decoder
        names = {module: name for name, module in decoder.named_modules()}
        rates[names[decoder.conv1]] = rate
        for block, s in zip(decoder.block, self.config.upsampling_ratios):
            rates[names[block.conv_t1]] = rate
            rate *= s
            for unit in (block.res_unit1, block.res_unit2, block.res_unit3):
                rates[names[unit.conv1]] = rates[names[unit.conv2]] = rate
        rates[names[decoder.conv2]] = rate
        return rates

    def reset(self, streams=None):
        """Restart streams. ``None``: all of them (the object is as new, also after ``flush``). Else a bool
        mask (B,) or indices: those streams drop what is in flight and start a new code sequence with the
        next push, while the others go on. Returns the number of samples each restarted stream returns
        before its new audio (zeros; the others' delayed samples in the same pushes): drop them."""
        if streams is None:
            self._layers = LayerStreams(self.model.decoder, self.batch_size, self._layer_rates(), packed=True)
            self.frames = 0  # frames pushed
            self.released = 0  # samples returned
            self.n_codebooks = None
            self.finished = False
            return 0
        mask = _check_streams(streams, self.batch_size)
        if self.finished:
            raise RuntimeError("the streams were flushed; reset() with no argument restarts them all")
        if self.frames == 0:
            return 0
        self._layers.restart(mask, self.frames)
        return self.frames * self.config.hop_length - self.released

    def _check_push(self, audio_codes) -> torch.Tensor:
        if self.finished:
            raise RuntimeError("push after flush: the streams are finished; call reset() to start new ones")
        if not isinstance(audio_codes, torch.Tensor) or audio_codes.dim() != 3:
            shape = tuple(audio_codes.shape) if isinstance(audio_codes, torch.Tensor) else type(audio_codes).__name__
            raise ValueError(f"audio_codes must be a tensor of shape (batch, n_codebooks, frames), got {shape}")
        if audio_codes.shape[0] != self.batch_size:
            raise ValueError(f"audio_codes has {audio_codes.shape[0]} streams; this decoder has {self.batch_size}")
        if self.n_codebooks is not None and audio_codes.shape[1] != self.n_codebooks:
            raise ValueError(f"audio_codes has {audio_codes.shape[1]} codebooks; earlier pushes had {self.n_codebooks}")
        audio_codes = check_codes(audio_codes, self.model.config)  # integer, 1..n_codebooks codebooks, non-empty, in range
        return audio_codes.to(self.model.device)

    def push(self, audio_codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, n, f) for the next f >= 1 frames of every stream -> the samples (B, k) now final, k >= 0.

        Validated whole before any state changes."""
        audio_codes = self._check_push(audio_codes)
        self.n_codebooks = audio_codes.shape[1]
        with torch.inference_mode(), self.model._backend_scope():
            latent = self.model.quantizer.from_codes(audio_codes)[0]
            if self._graphs is None:
                audio = self.model.decoder.inference(latent, self._layers)
            else:
                audio = self._graphs.step(self.model.decoder, latent, self._layers)
        self.frames += audio_codes.shape[-1]
        return self._release(audio)

    def flush(self) -> torch.Tensor:
        """The remaining samples (B, k) of every stream; ends the streams (``reset()`` restarts them)."""
        if self.finished:
            raise RuntimeError("flush after flush: the streams are finished; call reset() to start new ones")
        self.finished = True
        if self.frames == 0:
            return torch.zeros(self.batch_size, 0, dtype=self.model.dtype, device=self.model.device)
        self._layers.final = True
        with torch.inference_mode(), self.model._backend_scope():
            empty = torch.zeros(self.batch_size, self.config.hidden_size, 0, dtype=self.model.dtype,
                                device=self.model.device)
            audio = self.model.decoder.inference(empty, self._layers)
        return self._release(audio)

    def _release(self, audio: torch.Tensor) -> torch.Tensor:
        audio = audio.squeeze(1)
        if self._layers.starts is not None:  # restarted streams: zeros before their new audio
            start = self._layers.starts.to(audio.device) * self.config.hop_length
            audio = zero_outside(audio.unsqueeze(1), self.released, start=start).squeeze(1)
        self.released += audio.shape[-1]
        if self._layers.starts is not None:
            self._layers.settle(self.released >= int(self._layers.starts.max()) * self.config.hop_length)
        return audio


def encode_step(model, audio: torch.Tensor, layers: LayerStreams, n_quantizers: int) -> torch.Tensor:
    """One step of encode streams: samples (B, 1, s) through ``layers`` -> codes (B, n_quantizers, f) of the frames
    now final (f >= 0). Shared by ``StreamingEncoder`` and ``slots.SlotEncoder``."""
    latent = model.encoder.inference(audio, layers)
    if latent.shape[-1] == 0:
        return torch.zeros(audio.shape[0], n_quantizers, 0, dtype=torch.long, device=audio.device)
    return model.quantizer.encode_frames(latent, n_quantizers)[0]


class StreamingEncoder:
    """Encode ``batch_size`` audio streams as their samples arrive; see ``DacModel.streaming_encoder``."""

    def __init__(self, model, batch_size: int = 1, n_quantizers: int | None = None):
        self.model = model
        self.config = model.config
        self.batch_size = _check_batch_size(batch_size)
        self.n_quantizers = check_n_quantizers(n_quantizers, model.config.n_codebooks)
        # frame f (at sample f * hop_length) is final once samples through f * hop_length + right are in
        self.lookahead_samples = encoder_reach(self.config)[1]
        self.reset()

    def _layer_rates(self) -> dict[str, int]:
        """Input elements per latent frame of every convolution (hop_length at the input, 1 at the output)."""
        encoder = self.model.encoder
        names = {module: name for name, module in encoder.named_modules()}
        rate = self.config.hop_length
        rates = {names[encoder.conv1]: rate}
        for block, s in zip(encoder.block, self.config.downsampling_ratios):
            for unit in (block.res_unit1, block.res_unit2, block.res_unit3):
                rates[names[unit.conv1]] = rates[names[unit.conv2]] = rate
            rates[names[block.conv1]] = rate
            rate //= s
        rates[names[encoder.conv2]] = rate
        return rates

    def reset(self, streams=None) -> int:
        """Restart streams. ``None``: all of them (the object is as new, also after ``flush``). Else a bool
        mask (B,) or indices: those streams drop the audio in flight and start a new request with the next
        push, while the others go on. The streams share one frame grid, so a chosen stream can restart only
        on a frame boundary (samples pushed so far a multiple of ``hop_length``). Returns the number of
        frames each restarted stream returns before its new request's codes: they hold -1 (drop them). A new
        request shorter than one frame's worth of samples gets no frame here (``encode`` alone would zero-pad
        it to one hop and return one)."""
        if streams is None:
            self._layers = LayerStreams(self.model.encoder, self.batch_size, self._layer_rates())
            self.samples = 0  # samples pushed
            self.emitted = 0  # frames returned
            self.finished = False
            return 0
        mask = _check_streams(streams, self.batch_size)
        if self.finished:
            raise RuntimeError("the streams were flushed; reset() with no argument restarts them all")
        hop = self.config.hop_length
        if self.samples % hop:
            raise ValueError(f"reset(streams) restarts streams on a frame boundary: {self.samples} samples pushed is "
                             f"not a multiple of hop_length {hop}; push {hop - self.samples % hop} more first")
        if self.samples == 0:
            return 0
        self._layers.restart(mask, self.samples // hop)
        return self.samples // hop - self.emitted

    def _check_push(self, audio) -> torch.Tensor:
        if self.finished:
            raise RuntimeError("push after flush: the streams are finished; call reset() to start new ones")
        if not isinstance(audio, torch.Tensor) or audio.dim() != 3 or audio.shape[1] != 1:
            shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
            raise ValueError(f"audio must be a tensor of shape (batch, 1, samples), got {shape}")
        if audio.shape[0] != self.batch_size:
            raise ValueError(f"audio has {audio.shape[0]} streams; this encoder has {self.batch_size}")
        return check_stream_samples(audio).to(device=self.model.device, dtype=self.model.dtype)

    def push(self, audio: torch.Tensor) -> torch.Tensor:
        """Samples (B, 1, s), s >= 1 -> codes (B, n, f) of the frames now final, f >= 0."""
        audio = self._check_push(audio)
        codes = self._run(audio)
        self.samples += audio.shape[-1]
        return codes

    def flush(self) -> torch.Tensor:
        """Codes (B, n, f) of the remaining frames; ends the streams."""
        if self.finished:
            raise RuntimeError("flush after flush: the streams are finished; call reset() to start new ones")
        self.finished = True
        if self.samples == 0:
            return torch.zeros(self.batch_size, self.n_quantizers, 0, dtype=torch.long, device=self.model.device)
        short = max(0, self.config.hop_length - self.samples) if encoded_frames(self.config, self.samples) < 1 else 0
        # too short for one frame: zero-padded to one hop, as encode() pads such an input
        padded = self._run(torch.zeros(self.batch_size, 1, short, dtype=self.model.dtype, device=self.model.device))
        self.samples += short
        self._layers.final = True
        rest = self._run(torch.zeros(self.batch_size, 1, 0, dtype=self.model.dtype, device=self.model.device))
        return torch.cat([padded, rest], dim=-1)

    def _run(self, audio: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.model._backend_scope():
            codes = encode_step(self.model, audio, self._layers, self.n_quantizers)
        first, self.emitted = self.emitted, self.emitted + codes.shape[-1]
        if self._layers.starts is None:
            return codes
        # restarted streams: their old request's frames still in flight are not codes of anything
        frames = first + torch.arange(codes.shape[-1], device=codes.device)
        stale = frames.view(1, 1, -1) < self._layers.starts.to(codes.device).view(-1, 1, 1)
        self._layers.settle(self.emitted >= int(self._layers.starts.max()))
        return codes.masked_fill(stale, -1)
