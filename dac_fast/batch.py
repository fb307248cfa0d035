"""Batch encoding and decoding of audio files: ``encode_files`` / ``decode_files``.

Pipeline (encode): check the arguments and the output directory -> expand inputs (directories
recursively, globs) -> decide per input whether its output can be trusted (``dac_fast.resume``:
skip, redo, or refuse a run that would mix setups) -> sort by duration (from file headers) ->
read + resample + loudness-normalize ahead of the model (``_Prefetcher``: a reader thread pool,
a window and a memory budget; soundfile, soxr and pyloudnorm release the GIL in their C code) ->
bucket into batches -> one ``model.encode`` per batch, items retried one by one when a batch
fails (``run_with_fallback``) -> write each output atomically (``_WriteQueue``: a writer pool
with a bounded number of waiting results) -> record the output -> report.

Batching and exactness. DAC's convolutions see zeros past the end of a signal only when the
signal really ends there: zero-padding a shorter item to a longer one in the same batch
changes the codes of its last few frames (measured: the last ~4 of 20 frames differ). So the
default ``bucket="exact"`` only batches items with the same frame count ``ceil(n / hop)``
(after right-padding each item to a multiple of the hop, as the original ``preprocess``
does): the codes are then bit-for-bit those of encoding each file alone. Datasets of
fixed-length clips batch fully. ``bucket="mask"`` batches neighbours in sorted order of any
lengths and passes dac_fast's ``encode(padding_mask=)``, which zeroes each item's input past its
own length at every layer: codes again identical to encoding each file alone (dac_fast models
only). ``bucket="pad"`` batches neighbours padded to the longest without a mask and trims codes
to ``ceil(n / hop)`` per item (any model, but the last few frames of shorter items can differ
from a solo encode).

Long files: the model tiles long inputs internally with a halo so that codes equal the
whole-file codes and memory is bounded by the tile (``tile_frames`` is passed through when
the model supports it); this module never windows the model itself.

No lost work, no wrong work: outputs are written to a temporary file in the output directory and
renamed; a re-run skips outputs whose record matches (same model and settings, unchanged source,
output intact) and redoes the ones it knows as its own; a file the tools did not write is never
replaced without ``overwrite`` (``dac_fast.resume``); bad inputs are reported (path + reason) and
skipped; a full disk stops the run; Ctrl-C / SIGTERM finishes in-flight writes and removes
temporaries. Mistakes in the arguments raise :class:`UserError` before any model is loaded.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import itertools
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import io as aio
from .configuration import PRESETS, n_quantizers_problem
from .dacfile import DacFile, DacFileError, load_any
from .resume import OutputLog, identity_files, model_identity
from .runner import Failure, Report, _Item, _run, _to_device  # noqa: F401 (re-exported)

AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64", ".sd2", ".voc", ".htk", ".mat", ".pvf", ".xi",
)
CODE_EXTENSIONS = (".dac", ".json")
FORMATS = ("dac", "npy")
BUCKETS = ("exact", "mask", "pad")  # how the encoder groups items into batches (module docstring)
PRESET_NAMES = tuple(PRESETS)
SUBTYPES = {"pcm16": "PCM_16", "pcm24": "PCM_24", "float": "FLOAT"}


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


# ----------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------
def _is_model(obj) -> bool:
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
    import torch

    dev = check_device(device)
    dt = parse_dtype(dtype)
    if callable(spec) and not _is_model(spec) and not isinstance(spec, (str, os.PathLike)):
        spec = spec()  # a zero-argument loader: the model is built only when there is work to do
    if _is_model(spec):
        model = spec
    else:
        model = _load_from_spec(str(spec), seed, quiet)
    if dev is not None or dt is not None:
        model = model.to(device=dev, dtype=dt)
    model.eval()
    return model


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


def check_model_spec(spec: Any) -> None:
    """A :class:`UserError` (argument ``model``) for a spec that cannot name a model: a missing path,
    a file that is no checkpoint, or a name that is neither a preset nor a hub id like
    'descript/dac_16khz'. Checked before any work; the hub itself is asked only when loading."""
    if _is_model(spec) or callable(spec):
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
    from .loading import CONFIG_NAME, SAFETENSORS_NAME, TORCH_WEIGHTS_NAME

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


def _load_from_spec(spec: str, seed: int, quiet: bool):
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


def _dac_model_class():
    from .modeling import DacModel

    return DacModel


def model_config(spec: Any):
    """The config of ``spec`` when it can be read without building the model (a model object, a
    preset, a local directory with config.json), else None."""
    if _is_model(spec):
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


def check_n_quantizers(n_quantizers, n_codebooks: int | None = None) -> int | None:
    """``n_quantizers`` as an int in 1..n_codebooks (None passes through); :class:`UserError` otherwise."""
    if n_quantizers is None:
        return None
    nq = int(n_quantizers) if isinstance(n_quantizers, np.integer) else n_quantizers
    problem = n_quantizers_problem(nq, n_codebooks)
    if problem:
        raise UserError(problem, "n_quantizers")
    return nq


def _n_codebooks(config) -> int | None:
    return int(getattr(config, "n_codebooks", 0)) or None


def _check_nq(n_quantizers, model) -> int:
    """``check_n_quantizers`` against a model (kept for the Ray encoder)."""
    return check_n_quantizers(n_quantizers, _n_codebooks(model.config))


def _check_positive(**values):
    for name, v in values.items():
        if int(v) < 1:
            raise UserError(f"must be >= 1, got {v}", name)


def _accepts(fn, name) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _model_device_dtype(model):
    import torch

    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (StopIteration, AttributeError):
        return torch.device("cpu"), torch.float32


def _setup(task: str, model, seed: int, dtype, **settings) -> dict:
    """Everything that changes what a run writes, for the output records (``dac_fast.resume``)."""
    dt = parse_dtype(dtype)
    if dt is None:
        dt = _model_device_dtype(model)[1] if _is_model(model) else "torch.float32"
    return {"task": task, "model": model_identity(model, seed), "dtype": str(dt), **settings}


# ----------------------------------------------------------------------------------------------
# output directory and inputs
# ----------------------------------------------------------------------------------------------
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


def expand_inputs(inputs: Iterable[Any], extensions: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[Failure]]:
    """Expand files, directories (recursive) and glob patterns.

    Returns ``([(path, relative output stem base)], failures)``: outputs mirror the tree below a root,
    so that files of one name in different folders never meet. A directory's files are relative to
    it, a glob's matches to the folder its pattern starts from (``corpus/**/*.wav``: ``corpus``),
    plain files to the deepest folder they all share (one file: its own folder). Inputs that match
    nothing are failures; so is a directory without a single file of ``extensions`` (the failure
    says what it holds instead).
    """
    exts = tuple(e.lower() for e in extensions)
    out: list[tuple[Path, Path]] = []
    failures: list[Failure] = []
    seen = set()

    def add(p: Path, rel: Path):
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append((p, rel))

    files: list[Path] = []
    for item in inputs if not isinstance(inputs, (str, os.PathLike)) else [inputs]:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            found = [q for q in sorted(p.rglob("*")) if _wanted(q, exts)]
            if not found:
                kind = "audio" if set(exts) == set(AUDIO_EXTENSIONS) else "/".join(exts)
                failures.append(Failure(s, f"no {kind} files found (it holds {_describe_contents(p)})"))
            for q in found:
                add(q, q.relative_to(p))
        elif p.exists():
            files.append(p)
        elif glob.has_magic(s):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(s), recursive=True))]
            found = [q for q in matches if q.is_file()]
            if not found:
                failures.append(Failure(s, "glob matched no files"))
            root = _glob_root(s)
            for q in found:
                add(q, _relative(q, root))
        else:
            failures.append(Failure(s, "no such file or directory"))
    if files:
        root = os.path.commonpath([os.path.abspath(q.parent) for q in files])
        for q in files:
            add(q, _relative(q, root))
    return out, failures


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from: its leading components without wildcards."""
    parts = Path(os.path.expanduser(pattern)).parts[:-1]
    literal = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return os.path.join(*literal) if literal else "."


def _relative(path: Path, root: str) -> Path:
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    return Path(path.name) if ".." in rel.parts else rel  # a pattern like a/*/../b.wav


def _wanted(q: Path, exts) -> bool:
    if not q.is_file() or q.suffix.lower() not in exts or q.name.startswith("."):
        return False  # hidden files: our temporaries and records, editors' and OSes' droppings
    if _is_npy_codes(q):
        return False
    return q.suffix.lower() != ".json" or _json_has_codes(q)


def _describe_contents(directory: Path) -> str:
    counts: dict[str, int] = {}
    for q in directory.rglob("*"):
        if q.is_file() and not q.name.startswith("."):
            ext = ".codes.npy" if _is_npy_codes(q) else (q.suffix.lower() or "(no extension)")
            counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return "no files"
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return ", ".join(f"{n} {ext}" for ext, n in top) + (" ..." if len(counts) > 5 else "")


def _is_npy_codes(p: Path) -> bool:
    return p.name.endswith(".codes.npy")


def _json_has_codes(p: Path) -> bool:
    return p.with_name(p.name[: -len(".json")] + ".codes.npy").exists()


# ----------------------------------------------------------------------------------------------
# output naming / trust
# ----------------------------------------------------------------------------------------------
def encoded_output(output_dir: Path, rel: Path, fmt: str) -> Path:
    """The primary output of encoding ``rel``: ``.dac``, or the ``.json`` (written last) for npy."""
    stem = output_dir / rel.with_suffix("")
    if fmt == "dac":
        return stem.with_name(stem.name + ".dac")
    return stem.with_name(stem.name + ".json")


def _codes_intact(out: Path, holds: dict) -> str | None:
    """None when the codes output reads back with the recorded shape, else what is wrong."""
    try:
        f = load_any(out)
    except (DacFileError, OSError, ValueError) as exc:
        return str(exc).split(": ", 1)[-1]
    if list(f.codes.shape) != holds.get("shape"):
        return f"codes shape {list(f.codes.shape)}, recorded {holds.get('shape')}"
    return None


def _audio_intact(out: Path, holds: dict) -> str | None:
    """None when the decoded audio's header shows the recorded channels and length."""
    try:
        _, channels, frames = aio.audio_info(out)
    except aio.AudioError as exc:
        return exc.reason
    if [channels, frames] != [holds.get("channels"), holds.get("frames")]:
        return f"{channels} channels x {frames} frames, recorded {holds.get('channels')} x {holds.get('frames')}"
    return None


def companion_files(out: Path) -> list[Path]:
    """The files written with the output ``out`` (recorded under its name): npy format's codes."""
    return [out.with_name(out.name[: -len(".json")] + ".codes.npy")] if out.suffix == ".json" else []


def refuse_outputs_onto_inputs(pairs) -> None:
    """A :class:`UserError` (argument ``output_dir``) when an output of ``[(input, output)]`` would be
    any input itself (a symbolic or hard link too: same file), whatever ``overwrite`` says: a run never
    replaces its own input."""
    inputs = {}
    for src, _ in pairs:
        with contextlib.suppress(OSError):  # an input gone since it was listed fails later, alone
            inputs[_file_identity(src)] = src
    for src, out in pairs:
        for p in (out, *companion_files(Path(out))):
            try:
                hit = inputs.get(_file_identity(p))
            except OSError:  # nothing there yet
                continue
            if hit is not None:
                raise UserError(f"the output of {src} would be {p}, which is the input {hit}; nothing was "
                                "done: choose another output directory", "output_dir")


def _file_identity(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def output_collisions(pairs) -> tuple[list, list[Failure]]:
    """Split ``[(input, output)]`` into the pairs whose output is theirs alone and a failure for every input
    that shares its output with another (none of those is written: which one the user meant is unknown)."""
    by_output: dict[str, list] = {}
    for src, out in pairs:
        by_output.setdefault(os.path.abspath(out), []).append((src, out))
    kept, failures = [], []
    for group in by_output.values():
        if len(group) == 1:
            kept += group
            continue
        sources = [str(src) for src, _ in group]
        stems = {os.path.splitext(os.path.abspath(src))[0] for src in sources}
        why = ("different extensions of one stem" if len(stems) == 1
               else "one relative path under different input folders")
        for src in sources:
            failures.append(Failure(src, f"output {group[0][1]} would come from {len(sources)} inputs "
                                         f"({', '.join(sources)}): {why}; none of them is written"))
    return kept, failures


def _plan(expanded, out_of, log: OutputLog, intact, overwrite: bool, report: Report):
    """The (source, output) jobs of this run, decided before any work. An output that would be an input
    refuses the run; inputs sharing an output fail; an existing output is skipped only when its record
    vouches for it, redone when the record shows it is ours, and left alone (a failure) when the tools did
    not write it, unless ``overwrite``; made with another setup, the run is refused (:class:`UserError`)."""
    pairs = [(src, out_of(rel)) for src, rel in expanded]
    refuse_outputs_onto_inputs(pairs)
    pairs, collisions = output_collisions(pairs)
    report.failures += collisions
    jobs, other_setup = [], []
    for src, out in pairs:
        existing = [] if overwrite else [p for p in (out, *companion_files(out)) if p.exists()]
        if existing:
            verdict, why = log.verdict(src, out, intact, existing)
            if verdict == "skip":
                report.skipped.append((str(src), str(out)))
                continue
            if verdict == "other setup":
                other_setup.append((out, why))
                continue
            if verdict == "not ours":
                report.failures.append(Failure(str(src), why))
                continue
            report.redone.append(Failure(str(src), why))
        jobs.append((src, out))
    if other_setup:
        out, why = other_setup[0]
        raise UserError(
            f"{len(other_setup)} existing output(s) in {log.output_dir} were made with a different setup ({why}), "
            f"e.g. {out}. Use another output directory, or overwrite=True (--overwrite) to redo them.", "output_dir")
    return jobs


def supports_padding_mask(model) -> bool:
    """Whether ``model.encode`` takes ``padding_mask`` (dac_fast's DacModel: each item of a padded batch is
    encoded exactly as if alone)."""
    try:
        return "padding_mask" in inspect.signature(model.encode).parameters
    except (TypeError, ValueError):
        return False


def encode_rows(model, rows: list, frames: list, hop: int, device, dtype, n_quantizers=None, masked=False,
                **encode_kwargs):
    """The model step of every encoder (files, Ray actors): zero-pad each item's rows (channels, samples) to
    the longest item's ``frames * hop``, encode all rows in one call, and return each item's codes
    (channels, n_codebooks, its own frames) as int64 numpy arrays. ``masked`` (for models that
    ``supports_padding_mask``): items of different frame counts get a padding mask, so each item's codes
    equal encoding it alone."""
    import torch

    n_rows = sum(r.shape[0] for r in rows)
    buf = torch.zeros(n_rows, 1, max(frames) * hop, dtype=torch.float32)
    i = 0
    for r in rows:
        c, n = r.shape
        buf[i:i + c, 0, :n] = torch.from_numpy(np.require(r, requirements="W"))  # Ray hands read-only arrays
        i += c
    x = _to_device(buf, device).to(dtype)
    if n_quantizers is not None:
        encode_kwargs["n_quantizers"] = n_quantizers
    if masked and len(set(frames)) > 1:
        # each row is real (its item's padded length, frames * hop) up to there, padding after
        lengths = torch.tensor([f * hop for r, f in zip(rows, frames) for _ in range(r.shape[0])])
        encode_kwargs["padding_mask"] = _to_device(torch.arange(buf.shape[-1]) < lengths[:, None], device)
    with torch.inference_mode():
        out = model.encode(x, return_dict=True, **encode_kwargs)
    codes = out.audio_codes if hasattr(out, "audio_codes") else out[1]
    if n_quantizers is not None:
        codes = codes[:, :n_quantizers]
    codes = codes.to("cpu", torch.int64).numpy()
    res, i = [], 0
    for r, f in zip(rows, frames):
        res.append(codes[i:i + r.shape[0], :, :f])
        i += r.shape[0]
    return res


def _as_numpy(t):
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _start(model, output_dir, n_quantizers, batch_size, workers, device, dtype):
    """The checks every run makes before any work: arguments, device, n_quantizers against the
    model's config where it can be read without loading, the output directory."""
    _check_positive(batch_size=batch_size, workers=workers)
    check_n_quantizers(n_quantizers)
    check_device(device)
    parse_dtype(dtype)
    check_model_spec(model)
    cfg = model_config(model) if not callable(model) or _is_model(model) else None
    if cfg is not None:
        check_n_quantizers(n_quantizers, _n_codebooks(cfg))
    output_dir = prepare_output_dir(output_dir)
    if callable(model) and not _is_model(model) and not isinstance(model, (str, os.PathLike)):
        model = model()  # a deferred loader: its identity is needed to judge existing outputs
    return model, output_dir


def _finish(report: Report, log: OutputLog, t0: float) -> Report:
    log.close()
    report.wall_seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------
def encode_files(
    inputs,
    output_dir,
    model: Any,
    *,
    batch_size: int = 8,
    n_quantizers: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    workers: int = 2,
    overwrite: bool = False,
    format: str = "dac",
    progress: bool | None = None,
    bucket: str = "exact",
    normalize_db: float | None = -16.0,
    tile_frames: int | None = None,
    prefetch_memory: float = 2 << 30,
    seed: int = 0,
) -> Report:
    """Encode audio files to ``.dac`` (or ``format="npy"``) files under ``output_dir``.

    ``inputs``: files, directories (searched recursively for audio extensions) and glob
    patterns. ``model``: a model object or a spec for :func:`load_model` (``seed`` for presets).
    ``batch_size`` counts rows (a stereo file is two rows). ``bucket``: "exact" (default), "mask" or
    "pad" (see the module docstring). ``normalize_db``: loudness target (None: no normalization).
    ``tile_frames``: passed to the model's encode (its exact tiling of long inputs).
    ``prefetch_memory``: about how many bytes of decoded audio may be loaded ahead of the model
    (at least one file always is). Existing outputs are trusted only as ``dac_fast.resume``
    describes. Returns a :class:`Report`; failures do not stop the run; mistakes in the arguments
    raise :class:`UserError` before the model is loaded.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise UserError(f"must be one of {FORMATS}, got {format!r}", "format")
    if bucket not in BUCKETS:
        raise UserError(f"must be one of {BUCKETS}, got {bucket!r}", "bucket")
    model, output_dir = _start(model, output_dir, n_quantizers, batch_size, workers, device, dtype)
    report = Report(task="encode")
    expanded, report.failures = expand_inputs(inputs, AUDIO_EXTENSIONS)
    log = OutputLog(output_dir, _setup("encode", model, seed, dtype, n_quantizers=n_quantizers,
                                       # "mask" gives the codes of "exact": outputs of either are one setup
                                       normalize_db=normalize_db, bucket="exact" if bucket == "mask" else bucket))
    jobs = _plan(expanded, lambda rel: encoded_output(output_dir, rel, format), log, _codes_intact, overwrite, report)
    if not jobs:
        return _finish(report, log, t0)

    model = load_model(model, device, dtype, seed=seed)
    dev, mdtype = _model_device_dtype(model)
    sr, hop = model_rate_and_hop(model)
    nq = _check_nq(n_quantizers, model)
    if bucket == "mask" and not supports_padding_mask(model):
        raise UserError("'mask' needs a model whose encode takes padding_mask (dac_fast's DacModel); "
                        "use 'exact' or 'pad'", "bucket")
    enc_kwargs = {}
    if tile_frames is not None and _accepts(model.encode, "tile_frames"):
        enc_kwargs["tile_frames"] = int(tile_frames)

    def header(src):
        try:
            return aio.audio_info(src)
        except Exception:
            return None

    # each header read once (cheap): sort by duration so equal/similar lengths meet in the bucketer,
    # and size the prefetch window
    headers = {job[0]: header(job[0]) for job in jobs}
    jobs.sort(key=lambda job: (lambda h: h[2] / h[0] if h else 0.0)(headers[job[0]]))

    def size_fn(job):
        # float32 at the source rate and at the model rate, plus pyloudnorm's float64 working copies
        h = headers[job[0]]
        return h[1] * h[2] * 4 * (1 + 3 * max(1.0, sr / h[0])) if h else 0

    def load_fn(i, job):
        src, out = job
        audio, in_sr = aio.read_audio(src)
        channels, n = audio.shape
        x, input_db = aio.prepare_for_encoding(audio, in_sr, sr, normalize_db)
        frames = math.ceil(x.shape[-1] / hop)
        if frames == 0:
            raise aio.AudioError(src, "audio too short to encode")
        return _Item(i, src, out, rows=x, frames=frames,
                     meta=dict(input_db=input_db, sample_rate=in_sr, original_length=n, channels=channels,
                               duration=n / in_sr))

    def model_fn(batch: list[_Item]):
        return encode_rows(model, [it.rows for it in batch], [it.frames for it in batch], hop, dev, mdtype, nq,
                           masked=bucket == "mask", **enc_kwargs)

    def write_fn(it: _Item, codes):
        m = it.meta
        f = DacFile(codes=codes, input_db=np.array([m["input_db"]], np.float32), original_length=m["original_length"],
                    sample_rate=m["sample_rate"], chunk_length=codes.shape[-1], channels=m["channels"], padding=True)
        if format == "dac":
            f.save(it.out)
        else:
            f.extra = {"source": str(it.src), "model_sample_rate": sr, "hop_length": hop}
            f.save_npy(it.out.with_name(it.out.name[: -len(".json")]))
        return {"shape": list(f.codes.shape)}

    try:
        _run("encode", jobs, report, load_fn, model_fn, write_fn, batch_size=batch_size, workers=workers,
             exact=(bucket == "exact"), progress=_want_progress(progress), log=log, size_fn=size_fn,
             memory_budget=int(prefetch_memory))
    finally:
        _finish(report, log, t0)
    return report


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
def decode_files(
    inputs,
    output_dir,
    model: Any,
    *,
    batch_size: int = 8,
    n_quantizers: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    workers: int = 2,
    overwrite: bool = False,
    format: str = "wav",
    progress: bool | None = None,
    tile_frames: int | None = None,
    subtype: str = "pcm16",
    seed: int = 0,
) -> Report:
    """Decode ``.dac`` (or npy-format ``.json``) files to audio under ``output_dir``.

    Restores the original sample rate (soxr), length and channel count, and the loudness
    (each channel normalized back to the stored ``input_db``, as the original decompress).
    ``format`` is the audio extension (wav, flac, ogg); ``subtype`` the sample format of wav/flac
    outputs: "pcm16" (default, as the original), "pcm24" or "float" (wav only). Items are batched
    only with items of the same frame count, so batched decoding equals decoding each file alone.
    A file whose frame rate or codebook count does not fit the model fails (it was made by
    another model: decoding it would give noise).

    Files written by the original's chunked ``compress`` (``padding=False``, ``chunk_length``
    < frames) are decoded in one pass over all their frames, like our own whole-file codes;
    the original's ``decompress`` decodes such files chunk by chunk without convolution padding
    instead, so the audio near its chunk boundaries differs slightly (its boundary artefacts,
    upstream issue #39, are not reproduced). Length, rate, channels and loudness are restored
    the same way.
    """
    import torch

    t0 = time.perf_counter()
    fmt = format.lstrip(".").lower()
    if fmt in FORMATS:  # "dac"/"npy" are encode formats: the audio format defaults to wav
        fmt = "wav"
    if subtype not in SUBTYPES:
        raise UserError(f"must be one of {tuple(SUBTYPES)}, got {subtype!r}", "subtype")
    if subtype == "float" and fmt != "wav":
        raise UserError(f"'float' samples need --format wav, got {fmt!r}", "subtype")
    model, output_dir = _start(model, output_dir, n_quantizers, batch_size, workers, device, dtype)
    report = Report(task="decode")
    expanded, report.failures = expand_inputs(inputs, CODE_EXTENSIONS)
    log = OutputLog(output_dir, _setup("decode", model, seed, dtype, n_quantizers=n_quantizers,
                                       subtype=subtype if fmt in ("wav", "flac") else None))
    jobs = _plan(expanded, lambda rel: (output_dir / rel).with_suffix("." + fmt), log, _audio_intact, overwrite, report)
    if not jobs:
        return _finish(report, log, t0)

    model = load_model(model, device, dtype, seed=seed)
    dev, mdtype = _model_device_dtype(model)
    sr, hop = model_rate_and_hop(model)
    n_cb = _n_codebooks(model.config)
    nq = _check_nq(n_quantizers, model)
    cb_size = int(getattr(model.config, "codebook_size", 1024))
    dec_kwargs = {}
    if tile_frames is not None and _accepts(model.decode, "tile_frames"):
        dec_kwargs["tile_frames"] = int(tile_frames)
    sf_subtype = SUBTYPES[subtype] if fmt in ("wav", "flac") else None

    def load_fn(i, job):
        src, out = job
        f = load_any(src)
        f.check_fits_model(sr, hop, n_cb, cb_size, name=str(src))
        codes = f.codes.astype(np.int64)
        if nq is not None:
            codes = codes[:, :nq]
        return _Item(i, src, out, rows=codes, frames=codes.shape[-1], shape_key=codes.shape[1],
                     meta=dict(f=f, duration=f.original_length / f.sample_rate))

    def model_fn(batch: list[_Item]):
        # exact bucketing: every item of a batch has the same frame and codebook counts
        codes = torch.from_numpy(np.concatenate([it.rows for it in batch], 0))
        with torch.inference_mode():
            out = model.decode(audio_codes=_to_device(codes, dev), return_dict=True, **dec_kwargs)
        audio = out.audio_values if hasattr(out, "audio_values") else out[0]
        audio = _as_numpy(audio.reshape(audio.shape[0], -1))
        bounds = np.cumsum([0] + [it.rows.shape[0] for it in batch])
        return [audio[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]

    def write_fn(it: _Item, audio):
        f: DacFile = it.meta["f"]
        y = aio.restore_after_decoding(audio, sr, f.input_db, f.sample_rate, f.original_length, f.channels)
        aio.write_audio(it.out, y, f.sample_rate, subtype=sf_subtype)
        return {"channels": int(y.shape[0]), "frames": int(y.shape[1])}

    try:
        _run("decode", jobs, report, load_fn, model_fn, write_fn, batch_size=batch_size, workers=workers,
             exact=True, progress=_want_progress(progress), log=log)
    finally:
        _finish(report, log, t0)
    return report


def _want_progress(progress):
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def info(path) -> dict:
    """Metadata of a ``.dac`` / npy-format file, as a dict (for ``dac-fast info``).

    ``sample_rate`` is the rate of the audio that was encoded (restored by decoding), not the
    model's; the model's rate and frame rate are inferred from the frame count and duration (the
    file does not store them; npy-format files do) and the bitrate follows from them."""
    f = load_any(path)
    d = {
        "path": str(path), "dac_version": f.dac_version, "channels": f.channels,
        "n_codebooks": f.n_codebooks, "frames": f.frames, "chunk_length": f.chunk_length,
        "padding": f.padding, "sample_rate": f.sample_rate, "original_length": f.original_length,
        "duration_seconds": round(f.duration, 6), "input_db": [round(float(v), 3) for v in f.input_db],
        "codes_dtype": str(f.codes.dtype), "codes_shape": list(f.codes.shape),
        "code_range": [int(f.codes.min()), int(f.codes.max())] if f.codes.size else None,
    }
    msr, hop = f.extra.get("model_sample_rate"), f.extra.get("hop_length")
    source = "stored in the file"
    if msr is None or hop is None:
        msr, hop = _guess_model(f) or (None, None)
        source = "inferred from frames and duration"
    if msr and hop:
        frame_rate = msr / hop
        bits = math.log2(1024)  # every DAC codebook has 1024 entries
        d.update(model_sample_rate=int(msr), hop_length=int(hop), frame_rate=round(frame_rate, 3),
                 bitrate_kbps=round(f.n_codebooks * bits * frame_rate / 1000, 3), model_rates=source)
    else:
        d["model_rates"] = "unknown: the frame count fits none or several of the official models"
    return d


def _guess_model(f: DacFile) -> tuple[int, int] | None:
    """(model rate, hop) of the official models whose frame count fits the file, when one rate does."""
    fits = set()
    for name, cfg in PRESETS.items():
        hop = int(np.prod(cfg["downsampling_ratios"]))
        if f.n_codebooks <= cfg["n_codebooks"] and f.fits_frame_rate(cfg["sampling_rate"], hop):
            fits.add((cfg["sampling_rate"], hop))
    return fits.pop() if len(fits) == 1 else None
