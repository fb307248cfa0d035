"""Checks of what users pass in (audio, codes, latents, masks, n_quantizers), with messages that name the argument
and what was expected; data-dependent checks are read back from the device together (one host sync on CUDA)."""

from __future__ import annotations

import torch

from .configuration import n_quantizers_problem
from .feature_extraction import pcm_to_float


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


def check_audio(input_values: torch.Tensor, checks: DeviceChecks) -> torch.Tensor:
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


def check_n_quantizers(n_quantizers, n_codebooks: int) -> int:
    """``n_quantizers`` as an int in [1, n_codebooks] (None: all of them; a one-element tensor is read)."""
    if n_quantizers is None:
        return n_codebooks
    if isinstance(n_quantizers, torch.Tensor) and n_quantizers.numel() == 1:
        n_quantizers = int(n_quantizers.item())
    problem = n_quantizers_problem(n_quantizers, n_codebooks)
    if problem:
        raise ValueError(f"n_quantizers {problem}")
    return n_quantizers


def check_codes(audio_codes: torch.Tensor, config, checks: DeviceChecks | None = None) -> torch.Tensor:
    """Codes (B, n, F) for a model of ``config``: shape and dtype at once; the value range by ``checks`` (None:
    read now). Returns them as int64: any integer dtype that holds them is accepted (uint16 is how .dac files
    store them), and the range is checked in int64 (uint16 has no aminmax, uint8 would wrap ``< codebook_size``,
    int16 has no embedding)."""
    if not isinstance(audio_codes, torch.Tensor) or audio_codes.dim() != 3:
        shape = tuple(audio_codes.shape) if isinstance(audio_codes, torch.Tensor) else type(audio_codes).__name__
        raise ValueError(f"audio_codes must be a tensor of shape (batch, n_codebooks, frames), got {shape}")
    if audio_codes.is_floating_point() or audio_codes.is_complex() or audio_codes.dtype == torch.bool:
        raise TypeError(f"audio_codes must be an integer tensor, got dtype {audio_codes.dtype}")
    n = audio_codes.shape[1]
    if not 1 <= n <= config.n_codebooks:
        raise ValueError(f"audio_codes has {n} codebooks; this model has {config.n_codebooks}")
    if audio_codes.numel() == 0:
        raise ValueError(f"audio_codes is empty: shape {tuple(audio_codes.shape)}")
    audio_codes = audio_codes.long()
    if torch.compiler.is_compiling():  # the value range is data-dependent: checked in eager calls only
        return audio_codes
    size = config.codebook_size
    lo, hi = torch.aminmax(audio_codes)
    queue = DeviceChecks() if checks is None else checks
    queue.require((lo >= 0) & (hi < size),
                  lambda: f"audio_codes must lie in [0, {size}), got values in [{lo.item()}, {hi.item()}]")
    if checks is None:
        queue.run()
    return audio_codes


def check_latent(z: torch.Tensor, hidden_size: int) -> None:
    """A quantized representation (B, hidden_size, F), floating point."""
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[1] != hidden_size:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"quantized_representation must have shape (batch, {hidden_size}, frames), got {shape}")
    if not z.is_floating_point():
        raise TypeError(f"quantized_representation must be floating point, got dtype {z.dtype}")


def _require_inference(name: str, inference: bool) -> None:
    if not inference:
        raise ValueError(f"{name} is supported in inference only: call model.eval() and run under "
                         "torch.inference_mode() or torch.no_grad()")


def check_padding_mask(padding_mask, input_values: torch.Tensor, checks: DeviceChecks, inference: bool) -> torch.Tensor:
    """Valid lengths (B,) of a right-padding mask (B, T) for ``input_values`` (B, 1, T); its values are checked
    by ``checks``. ``inference``: the call runs without autograd in eval mode (the only mode masks support)."""
    shape = (input_values.shape[0], input_values.shape[-1])
    if not isinstance(padding_mask, torch.Tensor) or tuple(padding_mask.shape) != shape:
        got = tuple(padding_mask.shape) if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
        raise ValueError(f"padding_mask must be a tensor of shape (batch, samples) = {shape}, got {got}")
    _require_inference("padding_mask", inference)
    mask = padding_mask.to(input_values.device)
    checks.require(((mask == 0) | (mask == 1)).all(), "padding_mask must hold only 0 (padding) and 1 (real samples)")
    mask = mask.bool()
    lengths = mask.sum(-1)
    checks.require((mask == (torch.arange(shape[1], device=mask.device) < lengths.unsqueeze(1))).all(),
                   "padding_mask must mark right padding: ones for each item's samples, then zeros")
    checks.require((lengths > 0).all(), lambda: "padding_mask gives an item no samples "
                   f"(items {lengths.eq(0).nonzero().flatten().tolist()})")
    return lengths


def check_audio_frames(audio_frames, z: torch.Tensor, checks: DeviceChecks, inference: bool) -> torch.Tensor:
    """Frame counts (B,) for the latent or codes ``z`` (B, ., F); their values are checked by ``checks``."""
    batch, frames = z.shape[0], z.shape[-1]
    if not isinstance(audio_frames, torch.Tensor) or tuple(audio_frames.shape) != (batch,) \
            or audio_frames.is_floating_point() or audio_frames.dtype == torch.bool:
        got = (f"{tuple(audio_frames.shape)} {audio_frames.dtype}" if isinstance(audio_frames, torch.Tensor)
               else type(audio_frames).__name__)
        raise ValueError(f"audio_frames must be an integer tensor of shape ({batch},), got {got}")
    _require_inference("audio_frames", inference)
    lengths = audio_frames.to(z.device)
    checks.require(((lengths >= 1) & (lengths <= frames)).all(),
                   lambda: f"audio_frames must lie in [1, {frames}], got {audio_frames.tolist()}")
    return lengths


def check_tile_frames(tile_frames) -> int:
    if isinstance(tile_frames, bool) or not isinstance(tile_frames, int) or tile_frames < 1:
        raise ValueError(f"tile_frames must be a positive number of frames, got {tile_frames!r}")
    return tile_frames


def check_stream_samples(audio: torch.Tensor, name: str = "audio") -> torch.Tensor:
    """Samples pushed to an encode stream (any shape): floating point, at least one, finite."""
    if not audio.is_floating_point():
        raise TypeError(f"{name} must be floating point in [-1, 1], got dtype {audio.dtype}")
    if audio.shape[-1] == 0:
        raise ValueError(f"{name} is empty: push at least one sample")
    if not torch.isfinite(audio).all():
        raise ValueError(f"{name} contains NaN or Inf samples")
    return audio

