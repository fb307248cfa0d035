"""The model of a file job (``encode_files``, ``decode_files``, the Ray encoder), resolved once: its spec checked
before any work, its identity for the output records read without building it, then built once into one
``JobModel`` value that the rest of the run reads (model, device, dtype, rates, codebooks)."""

from __future__ import annotations

import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import io as aio
from .arguments import UserError, check_device, check_n_quantizers, parse_dtype
from .configuration import PRESETS
from .resume import identity_files, model_identity

PRESET_NAMES = tuple(PRESETS)


class JobModel:
    """The model of one job. The constructor checks what concerns the model (``UserError``) without loading it;
    ``setup()`` gives what output records hold (calling a deferred loader first: its identity is needed to
    judge existing outputs); ``load()`` builds the model once and reads ``model``, ``device``, ``dtype``,
    ``sample_rate``, ``hop``, ``n_codebooks``, ``codebook_size``, and ``n_quantizers`` checked against it."""

    def __init__(self, spec: Any, *, device=None, dtype=None, seed: int = 0, n_quantizers: int | None = None,
                 quiet: bool = False):
        self.n_quantizers = check_n_quantizers(n_quantizers)
        self.device_arg, self.dtype_arg = check_device(device), parse_dtype(dtype)
        check_model_spec(spec)
        config = model_config(spec) if not callable(spec) or is_model(spec) else None
        if config is not None:
            check_n_quantizers(n_quantizers, n_codebooks_of(config))
        self.spec, self.seed, self.quiet, self.model = spec, seed, quiet, None

    def _resolve_deferred(self) -> None:
        self.spec = _called(self.spec)  # a deferred loader runs only once the arguments are known good

    def setup(self, task: str, **settings) -> dict:
        """Everything that changes what a run writes, for the output records (``dac_fast.resume``)."""
        self._resolve_deferred()
        dtype = self.dtype_arg
        if dtype is None:
            dtype = model_device_dtype(self.spec)[1] if is_model(self.spec) else "torch.float32"
        return {"task": task, "model": model_identity(self.spec, self.seed), "dtype": str(dtype), **settings}

    def load(self) -> "JobModel":
        if self.model is None:
            self._resolve_deferred()
            # the spec was checked by the constructor
            model = self.model = _build(self.spec, self.device_arg, self.dtype_arg, self.seed, self.quiet,
                                        spec_checked=True)
            self.device, self.dtype = model_device_dtype(model)
            self.sample_rate, self.hop = model_rate_and_hop(model)
            self.n_codebooks = n_codebooks_of(model.config)
            self.codebook_size = int(getattr(model.config, "codebook_size", 1024))
            self.n_quantizers = check_n_quantizers(self.n_quantizers, self.n_codebooks)
        return self

    def call_options(self, method: str, tile_frames: int | None) -> dict:
        """Keyword arguments for ``model.<method>``: ``tile_frames`` where the model takes it."""
        if tile_frames is not None and accepts(getattr(self.model, method), "tile_frames"):
            return {"tile_frames": int(tile_frames)}
        return {}


def is_model(obj) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module) or (hasattr(obj, "encode") and hasattr(obj, "config"))


def load_model(spec: Any, device: str | None = None, dtype: Any = None, *, seed: int = 0, quiet: bool = False):
    """Load a DAC model from ``spec``.

    ``spec``: an already-built model (returned as is, moved to device/dtype); a zero-argument
    callable returning one (called here, so callers can defer loading until needed); a local
    directory (``DacModel.from_pretrained``); an original ``.pth`` checkpoint
    (``DacModel.from_original``); a preset name ``16khz``/``24khz``/``44khz``/``44khz_16kbps``
    (``DacModel.from_preset``: RANDOM weights in the real shapes, for trying the pipeline out -
    a warning says so unless ``quiet``); anything else is treated as a hub id (``from_pretrained``).
    Raises :class:`UserError` (argument ``model``/``device``/``dtype``) when the spec cannot be used.
    """
    return _build(_called(spec), check_device(device), parse_dtype(dtype), seed, quiet, spec_checked=False)


def _called(spec: Any) -> Any:
    """``spec()`` for a zero-argument loader (the model is built only when there is work to do), else ``spec``."""
    if callable(spec) and not is_model(spec) and not isinstance(spec, (str, os.PathLike)):
        return spec()
    return spec


def _build(spec: Any, device, dtype, seed: int, quiet: bool, spec_checked: bool):
    """The model of ``spec`` (a model or a spec string) on ``device``/``dtype`` (parsed), in eval mode."""
    model = spec if is_model(spec) else _load_from_spec(str(spec), seed, quiet, spec_checked)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def check_model_spec(spec: Any) -> None:
    """A :class:`UserError` (argument ``model``) for a spec that cannot name a model: a missing path,
    a file that is no checkpoint, or a name that is neither a preset nor a hub id like
    'descript/dac_16khz'. Checked before any work; the hub itself is asked only when loading."""
    if is_model(spec) or callable(spec):
        return
    s = str(spec)
    p = Path(s).expanduser()
    presets = f"presets with random weights: {', '.join(PRESET_NAMES)}"
    if s in PRESET_NAMES:
        return
    if p.is_dir():
        return _check_model_dir(p)
    if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES:
        return _check_readable(p)
    if p.is_file():
        raise UserError(f"don't know how to load a model from file {p} (expected a model directory, a "
                        f"{'/'.join(_CHECKPOINT_SUFFIXES)} checkpoint, a hub id or a preset)", "model")
    if p.suffix in _CHECKPOINT_SUFFIXES or s.startswith((".", "/", "~")):
        raise UserError(f"{p} does not exist (checkpoint or model directory expected; {presets})", "model")
    if not _HUB_ID.fullmatch(s):
        raise UserError(f"{s!r} is not a local model directory, a checkpoint file or a hub id like "
                        f"'descript/dac_16khz' ({presets})", "model")


def _check_model_dir(directory: Path) -> None:
    from .hub import CONFIG_NAME, SAFETENSORS_NAME, TORCH_WEIGHTS_NAME

    if aio.open_problem(directory / CONFIG_NAME) == "no such file":
        raise UserError(f"{directory} is not a model directory: it has no {CONFIG_NAME}", "model")
    _check_readable(directory / CONFIG_NAME)  # also a folder the user may not enter
    if not any((directory / name).exists() for name in (SAFETENSORS_NAME, TORCH_WEIGHTS_NAME)):
        raise UserError(f"{directory} holds no model weights ({SAFETENSORS_NAME} or {TORCH_WEIGHTS_NAME})", "model")
    try:
        files = identity_files(directory)  # every file the run reads before loading (resume's model identity)
    except OSError as exc:
        raise UserError(f"cannot list {directory}: {aio.os_reason(exc)}", "model") from None
    for q in files:
        _check_readable(q)


def _check_readable(path: Path) -> None:
    problem = aio.open_problem(path)
    if problem:
        raise UserError(f"cannot read {path}: {problem}", "model")


def _load_from_spec(spec: str, seed: int, quiet: bool, spec_checked: bool):
    if not spec_checked:  # a directory's check lists and opens its files: once per run is enough
        check_model_spec(spec)
    DacModel = _dac_model_class()
    p = Path(spec).expanduser()
    if spec in PRESET_NAMES:
        if not quiet:
            warnings.warn(f"model preset {spec!r} has RANDOM weights (seed {seed}) in the real shapes: codes and "
                          "audio are meaningless; load a checkpoint for real use", UserWarning, stacklevel=3)
        return DacModel.from_preset(spec, seed=seed)
    try:
        if p.is_dir():
            return DacModel.from_pretrained(str(p))
        if p.is_file():
            return DacModel.from_original(str(p))
        return DacModel.from_pretrained(spec)
    except Exception as exc:  # a corrupt or foreign checkpoint (torch.load, safetensors, config) is the user's to fix
        raise UserError(f"cannot load model {spec!r}: {type(exc).__name__}: {str(exc)[:500]}", "model") from None


def _dac_model_class():
    from .modeling import DacModel

    return DacModel


def model_config(spec: Any):
    """The config of ``spec`` when it can be read without building the model (a model object, a
    preset, a local directory with config.json), else None."""
    if is_model(spec):
        return spec.config
    from .configuration import DacConfig

    s = str(spec)
    if s in PRESET_NAMES:
        return DacConfig.from_preset(s)
    p = Path(s).expanduser()
    if (p / "config.json").is_file():
        try:
            return DacConfig.from_pretrained(p)
        except (OSError, ValueError):
            return None
    return None


def model_rate_and_hop(model) -> tuple[int, int]:
    cfg = getattr(model, "config", model)
    ratios = getattr(cfg, "downsampling_ratios", None)
    hop = int(np.prod(ratios)) if ratios else int(cfg.hop_length)  # hub configs may carry a stale hop
    return int(cfg.sampling_rate), hop


def n_codebooks_of(config) -> int | None:
    return int(getattr(config, "n_codebooks", 0)) or None


def accepts(fn, name) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def supports_padding_mask(model) -> bool:
    """Whether ``model.encode`` takes ``padding_mask`` (dac_fast's DacModel: each item of a padded batch is
    encoded exactly as if alone)."""
    try:
        return "padding_mask" in inspect.signature(model.encode).parameters
    except (TypeError, ValueError):
        return False


def model_device_dtype(model):
    import torch

    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (StopIteration, AttributeError):
        return torch.device("cpu"), torch.float32
