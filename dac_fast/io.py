"""Audio file input/output for the dac_fast file pipeline.

* :func:`read_audio` reads anything libsndfile reads (wav, flac, ogg, ...) into a float32
  array of shape ``(channels, samples)`` and rejects empty, NaN/Inf and unreadable audio
  with an :class:`AudioError` that names the path and the reason.
* :func:`resample` converts sample rates with soxr (the SoX resampler library, "HQ").
* :func:`loudness` / :func:`normalize_loudness` / :func:`ensure_max_of_audio` reproduce what
  the original ``DAC.compress`` / ``decompress`` do through audiotools: ITU-R BS.1770-4
  integrated loudness (pyloudnorm's K-weighting filters, audiotools' block framing and
  gating: equal to audiotools' Meter within 1e-5 dB, where plain pyloudnorm can differ by
  0.6 dB on short clips), clips shorter than 0.5 s zero-padded to 0.5 s before measuring,
  loudness clamped to at least -70 LUFS (silence gives -70, never -inf or NaN), gain
  ``10 ** ((target - measured) / 20)``, then a per-channel peak limit to 1.0.
* :func:`atomic_write` / :func:`atomic_path` write outputs through a temporary file in the
  destination directory followed by ``os.replace``, removing the temporary file on any
  exception including ``KeyboardInterrupt``, so an interrupted run never leaves a partial
  output under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Union

import numpy as np

PathLike = Union[str, os.PathLike]

MIN_LOUDNESS = -70.0
"""Floor applied to measured loudness (audiotools' ``MIN_LOUDNESS``)."""

MIN_LOUDNESS_DURATION = 0.5
"""Clips shorter than this (seconds) are zero-padded to it before measuring (as audiotools)."""

TMP_PREFIX = ".dacfast-tmp-"
"""Prefix of temporary files; anything starting with it is never a finished output."""

_HOST = socket.gethostname().replace("-", "_") or "host"
_UMASK = os.umask(0)  # read once at import (os.umask is the only portable way to read it), then restored
os.umask(_UMASK)


# ----------------------------------------------------------------------------------------------
# optional dependencies
# ----------------------------------------------------------------------------------------------
# module (or top-level package) -> (pip package, how to install it). The model, ops and feature extractor need only torch and
# numpy; the file pipeline's libraries are default dependencies of dac-fast, Ray's are the [ray] extra.
_OPTIONAL = {
    "soundfile": ("soundfile", "pip install soundfile (a default dependency: `pip install dac-fast` installs it)"),
    "soxr": ("soxr", "pip install soxr (a default dependency: `pip install dac-fast` installs it)"),
    "pyloudnorm": ("pyloudnorm", "pip install pyloudnorm (a default dependency: `pip install dac-fast` installs it)"),
    "scipy": ("scipy", "pip install scipy (pyloudnorm's dependency: `pip install dac-fast` installs it)"),
    "ray": ("ray[data]", "pip install 'dac-fast[ray]'"),
    "pyarrow": ("pyarrow", "pip install 'dac-fast[ray]'"),
    "ray.serve": ("ray[serve]", "pip install 'dac-fast[serve-ray]'"),
    **{name: (name, "pip install 'dac-fast[serve]'") for name in ("uvicorn", "starlette", "websockets")},
    "prometheus_client": ("prometheus-client", "pip install 'dac-fast[serve]'"),
}


class MissingDependencyError(ImportError):
    """An optional package needed by the function called is not installed; the message says how to install it."""


def require(module: str, purpose: str):
    """Import ``module`` (e.g. ``"soundfile"``, ``"pyarrow.parquet"``) for ``purpose``, or raise
    :class:`MissingDependencyError` naming the package and the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: soundfile raises it when libsndfile itself is missing
        cause = exc
    top = module.split(".")[0]
    package, install = _OPTIONAL.get(module) or _OPTIONAL.get(top, (top, f"pip install {top}"))
    raise MissingDependencyError(
        f"{purpose} needs the {package!r} package, which cannot be imported ({type(cause).__name__}: {cause}). "
        f"Install it with: {install}", name=top) from cause


_OS_REASONS = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file", errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write error that every later write would hit too


def os_reason(exc: OSError) -> str:
    """What went wrong, in a few plain words ("permission denied", "no such file" ...), without the
    errno and path noise of ``str(exc)``."""
    return _OS_REASONS.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__).lower()


def open_problem(path: PathLike) -> str | None:
    """None when ``path`` opens for reading, else why not (:func:`os_reason`): libraries that read
    files themselves (libsndfile, safetensors) report these as vague errors or tracebacks."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return os_reason(exc)


class AudioError(ValueError):
    """A file could not be used as audio. ``str(err)`` names the path and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ----------------------------------------------------------------------------------------------
# reading / writing audio
# ----------------------------------------------------------------------------------------------
def audio_info(path: PathLike):
    """Return ``(sample_rate, channels, frames)`` from the file header without decoding."""
    sf = require("soundfile", "reading audio files")

    problem = open_problem(path)
    if problem:
        raise AudioError(path, problem)
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError/TypeError
        raise AudioError(path, f"unreadable audio ({_short(exc)})") from None
    return int(info.samplerate), int(info.channels), int(info.frames)


def read_audio(path: PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file into ``(float32 array (channels, samples), sample_rate)``.

    Raises :class:`AudioError` for unreadable/corrupt/truncated files, zero-length audio and
    audio containing NaN or Inf.
    """
    sf = require("soundfile", "reading audio files")

    p = Path(path)
    problem = open_problem(p)
    if problem:
        raise AudioError(p, problem)
    if p.stat().st_size == 0:
        raise AudioError(p, "empty file (0 bytes)")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(p, f"unreadable audio ({_short(exc)})") from None
    if data.shape[0] == 0:
        raise AudioError(p, "zero-length audio (no samples)")
    truncated = _truncation(p)
    if truncated:
        raise AudioError(p, truncated)
    if data.shape[1] == 0:
        raise AudioError(p, "audio has no channels")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(p, f"audio contains {bad} NaN/Inf samples")
    return np.ascontiguousarray(data.T), int(sr)


def write_audio(path: PathLike, audio: np.ndarray, sample_rate: int, subtype: str | None = None):
    """Atomically write ``audio`` (channels, samples) with soundfile.

    The format follows the extension (``.wav`` defaults to 16-bit PCM like the original,
    ``.flac`` 16-bit, anything else soundfile's default). Samples are clipped to [-1, 1].
    """
    sf = require("soundfile", "writing audio files")

    path = Path(path)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    fmt = path.suffix.lstrip(".").upper() or "WAV"
    if subtype is None and fmt in ("WAV", "FLAC"):
        subtype = "PCM_16"
    data = np.clip(audio.T, -1.0, 1.0)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, int(sample_rate), subtype=subtype, format=fmt)
    return path


_DATA_SIZE_RE = None


def _truncation(path: Path) -> str | None:
    """Detect a truncated WAV-family file: libsndfile reads those silently, but its header log
    says ``data : <declared> (should be <present>)``. Declared sizes of 0 or 0xFFFFFFFF (streamed
    WAVs) are larger-than-declared files, not truncation, and are accepted."""
    global _DATA_SIZE_RE
    import re

    sf = require("soundfile", "reading audio files")

    if _DATA_SIZE_RE is None:
        _DATA_SIZE_RE = re.compile(r"^\s*data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
    try:
        log = sf.info(str(path)).extra_info
    except Exception:
        return None
    m = _DATA_SIZE_RE.search(log or "")
    if m:
        declared, present = int(m.group(1)), int(m.group(2))
        if 0 < present < declared < 0xFFFFFFFF:
            return f"truncated file: header declares {declared} bytes of audio data, only {present} present"
    return None


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------
def resample(audio: np.ndarray, orig_sr: int, target_sr: int, quality: str = "HQ") -> np.ndarray:
    """Resample ``audio`` (channels, samples) or (samples,) with soxr. No-op if rates match.

    Output length is soxr's, ``ceil(n * target / orig)`` (rounded): callers that need an exact
    length trim or pad afterwards.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if int(orig_sr) == int(target_sr):
        return audio
    soxr = require("soxr", "resampling audio")

    if audio.ndim == 1:
        return soxr.resample(audio, orig_sr, target_sr, quality=quality).astype(np.float32)
    out = soxr.resample(np.ascontiguousarray(audio.T), orig_sr, target_sr, quality=quality)
    if out.ndim == 1:
        out = out[:, None]
    return np.ascontiguousarray(out.T, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# loudness (ITU-R BS.1770-4, as the original compress/decompress use it)
# ----------------------------------------------------------------------------------------------
_CHANNEL_GAINS = (1.0, 1.0, 1.0, 1.41, 1.41)  # BS.1770 channel weights (L, R, C, Ls, Rs)


def loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS of ``audio`` (channels, samples), channels measured together.

    The measurement the original ``compress`` stores as ``input_db`` (audiotools'
    ``AudioSignal.loudness()``, a tensor port of pyloudnorm), reproduced step by step:

    * clips shorter than 0.5 s are zero-padded to 0.5 s (pyloudnorm needs one 400 ms block);
    * ITU-R BS.1770-4 K-weighting with pyloudnorm's filter coefficients (IIR, ``lfilter``);
    * 400 ms blocks with 75 % overlap, framed like audiotools (julius ``unfold``: the tail is
      zero-padded into one more block, where pyloudnorm rounds the block count);
    * absolute (-70 LUFS) and relative (-10 LU) gating, channel weights 1, 1, 1, 1.41, 1.41
      (1.0 beyond five channels);
    * the result clamped to >= -70 LUFS, so silence gives -70.0 (never -inf or NaN).

    Block energies come from a cumulative sum, so long files cost O(samples).
    """
    pyloudnorm = require("pyloudnorm", "loudness normalization")
    lfilter = require("scipy.signal", "loudness normalization").lfilter

    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.shape[-1] < MIN_LOUDNESS_DURATION * sample_rate:
        pad = int((MIN_LOUDNESS_DURATION - x.shape[-1] / sample_rate) * sample_rate)  # as audiotools
        x = np.pad(x, ((0, 0), (0, max(pad, 0))))
    nch = x.shape[0]
    for stage in pyloudnorm.Meter(int(sample_rate))._filters.values():
        x = stage.passband_gain * lfilter(stage.b, stage.a, x, axis=-1)
    kernel = int(0.4 * sample_rate)
    stride = int(0.4 * sample_rate * 0.25)
    n = x.shape[-1]
    n_frames = math.ceil((max(n, kernel) - kernel) / stride) + 1
    csum = np.zeros((nch, (n_frames - 1) * stride + kernel + 1))
    np.cumsum(np.square(x), axis=-1, out=csum[:, 1 : n + 1])
    csum[:, n + 1 :] = csum[:, n : n + 1]  # zero padding adds no energy
    starts = np.arange(n_frames) * stride
    z = (csum[:, starts + kernel] - csum[:, starts]) / (0.4 * sample_rate)  # (channels, blocks)
    z = np.maximum(z, 0.0)  # cumsum rounding
    g = np.array([_CHANNEL_GAINS[i] if i < len(_CHANNEL_GAINS) else 1.0 for i in range(nch)])[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lvl = -0.691 + 10.0 * np.log10((g * z).sum(0))
        above_abs = lvl > -70.0
        z_avg = (z * above_abs).sum(1) / above_abs.sum()
        gamma_r = -0.691 + 10.0 * np.log10((g[:, 0] * np.nan_to_num(z_avg)).sum()) - 10.0
        gated = above_abs & (lvl > gamma_r)
        z_avg = np.nan_to_num((z * gated).sum(1) / gated.sum())
        value = float(-0.691 + 10.0 * np.log10((g[:, 0] * z_avg).sum()))
    if not np.isfinite(value) or value < MIN_LOUDNESS:
        value = MIN_LOUDNESS
    return value


def normalize_loudness(audio: np.ndarray, current_db: float, target_db: float) -> np.ndarray:
    """Scale ``audio`` from ``current_db`` to ``target_db`` LUFS (audiotools ``normalize``)."""
    gain = np.exp((float(target_db) - float(current_db)) * (np.log(10.0) / 20.0))
    return (np.asarray(audio, dtype=np.float32) * np.float32(gain)).astype(np.float32)


def ensure_max_of_audio(audio: np.ndarray, max_value: float = 1.0) -> np.ndarray:
    """Scale down every channel whose peak exceeds ``max_value`` (audiotools semantics)."""
    audio = np.asarray(audio, dtype=np.float32)
    peak = np.abs(audio).max(axis=-1, keepdims=True) if audio.shape[-1] else np.zeros(audio.shape[:-1] + (1,), np.float32)
    gain = np.ones_like(peak)
    over = peak > max_value
    gain[over] = max_value / peak[over]
    return audio * gain


def prepare_for_encoding(
    audio: np.ndarray, sample_rate: int, model_rate: int, normalize_db: float | None = -16.0
) -> tuple[np.ndarray, float]:
    """The original compress' preprocessing: resample, measure, normalize, limit peaks.

    Returns ``(audio at model_rate (channels, samples), input_db)``.
    """
    x = resample(audio, sample_rate, model_rate)
    input_db = loudness(x, model_rate)
    if normalize_db is not None:
        x = normalize_loudness(x, input_db, normalize_db)
    x = ensure_max_of_audio(x)
    return x, input_db


def restore_after_decoding(
    recon: np.ndarray, model_rate: int, input_db, sample_rate: int, original_length: int, channels: int
) -> np.ndarray:
    """The original decompress' postprocessing, on ``recon`` (channels, samples) at model rate.

    Each channel is normalized to ``input_db`` (the original decodes channels as a batch, so
    loudness is measured per channel), resampled to ``sample_rate`` and trimmed (or
    zero-padded) to ``original_length``. Returns (channels, original_length) float32.
    """
    recon = np.asarray(recon, dtype=np.float32)
    if recon.ndim == 1:
        recon = recon[None]
    db = np.asarray(input_db, dtype=np.float64).reshape(-1)
    out = []
    for i, ch in enumerate(recon):
        target = float(db[i] if db.size == recon.shape[0] else db[0])
        cur = loudness(ch[None], model_rate)
        out.append(normalize_loudness(ch, cur, target))
    y = resample(np.stack(out), model_rate, sample_rate)
    if y.shape[-1] >= original_length:
        y = y[:, :original_length]
    else:
        y = np.pad(y, ((0, 0), (0, original_length - y.shape[-1])))
    return np.ascontiguousarray(y.reshape(channels, original_length), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def give_normal_permissions(path: PathLike) -> None:
    """Mode 0666 less the umask, as ``open`` would create the file: writers that create files 0600
    (mkstemp, safetensors) would leave them unreadable to the other users of a shared directory."""
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success ``os.replace`` it onto ``path``.

    The temporary keeps ``path``'s extension (libraries that pick a format from it work). On
    any exception, ``KeyboardInterrupt`` included, the temporary is removed and the error
    re-raised; ``path`` is then either absent or its previous complete version.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{path.stem}.", suffix=path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync_file(tmp)
        give_normal_permissions(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb"):
    """Open a temporary file for writing; it becomes ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def cleanup_temp_files(directory: PathLike, stale_seconds: float = 24 * 3600) -> int:
    """Remove temporary files left under ``directory`` by killed runs.

    Temporaries are named ``.dacfast-tmp-<host>-<pid>-...``. One is removed when its process is
    gone (same host), or, for another host or an unparsable name, when it is older than
    ``stale_seconds``: concurrent runs writing into the same directory (several workers, a
    shared filesystem) never lose a write in flight.
    """
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    now = time.time()
    for p in d.rglob(TMP_PREFIX + "*"):
        owner = _tmp_owner(p.name)
        if owner is not None and owner[0] == _HOST:
            if _pid_alive(owner[1]):
                continue
        else:
            try:
                if now - p.stat().st_mtime < stale_seconds:
                    continue
            except OSError:
                continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def _tmp_owner(name: str):
    """``(host, pid)`` from ``.dacfast-tmp-<host>-<pid>-...`` (host has '-' replaced), else None."""
    parts = name[len(TMP_PREFIX):].split("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _fsync_file(path: Path):
    try:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError:
        pass


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg[:200]


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
