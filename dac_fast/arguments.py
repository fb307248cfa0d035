"""The file tools' arguments, checked before any work: one ``UserError`` type naming the argument at fault,
and the checks of device, dtype, n_quantizers, counts and the output directory that the API and the CLI share."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import io as aio
from .configuration import n_quantizers_problem


class UserError(ValueError):
    """A mistake in what the caller asked for (an argument, the output directory, the model spec).

    ``argument`` names the keyword argument at fault (None when it is not one argument); the CLI
    prints ``--flag-name: message`` without a traceback and exits 2."""

    def __init__(self, message: str, argument: str | None = None):
        self.message, self.argument = message, argument
        super().__init__(f"{argument}: {message}" if argument else message)

    def for_cli(self) -> str:
        if not self.argument:
            return self.message
        return f"--{self.argument.replace('_', '-')}: {self.message}"


def check_device(device) -> Any:
    """``device`` as a torch.device, or None; a :class:`UserError` (argument ``device``) when it is
    malformed or names a CUDA device this machine cannot use."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"not a torch device: {device!r} ({exc})", "device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA driver or GPU is visible"
            raise UserError(f"{device!r} requested but CUDA is not available ({why}); use --device cpu", "device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible", "device")
    return dev


def parse_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}", "dtype") from None


def check_n_quantizers(n_quantizers, n_codebooks: int | None = None) -> int | None:
    """``n_quantizers`` as an int in 1..n_codebooks (None passes through); :class:`UserError` otherwise."""
    if n_quantizers is None:
        return None
    nq = int(n_quantizers) if isinstance(n_quantizers, np.integer) else n_quantizers
    problem = n_quantizers_problem(nq, n_codebooks)
    if problem:
        raise UserError(problem, "n_quantizers")
    return nq


def check_positive(**values):
    """A :class:`UserError` naming the first of ``values`` (name=count) below 1."""
    for name, v in values.items():
        if int(v) < 1:
            raise UserError(f"must be >= 1, got {v}", name)


def prepare_output_dir(output_dir) -> Path:
    """Create ``output_dir`` and prove it writable, before any work: a :class:`UserError`
    (argument ``output_dir``) when it is a file, cannot be created or cannot be written."""
    p = Path(output_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{p} exists and is not a directory", "output_dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=aio.TMP_PREFIX + "probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to {p}: {exc.strerror or exc}", "output_dir") from None
    aio.cleanup_temp_files(p)
    return p
