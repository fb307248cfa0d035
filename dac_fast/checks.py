"""Checks of what users pass in (audio, codes, latents, masks, n_quantizers), with messages that name the argument
and what was expected; data-dependent checks are read back from the device together (one host sync on CUDA)."""

from __future__ import annotations

import torch

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
