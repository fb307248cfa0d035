"""Batch encoding and decoding of audio files: ``encode_files`` / ``decode_files``.

Pipeline (encode): expand inputs (directories recursively, globs) -> skip inputs whose output
is already complete (unless ``overwrite``) -> sort by duration (from file headers) -> read +
resample + loudness-normalize in a background thread pool (soundfile, soxr, pyloudnorm; they
release the GIL in their C code) -> bucket into batches -> one ``model.encode`` per batch
(channels folded into the batch, pinned memory + non-blocking copies on CUDA) -> write each
output atomically in a writer thread -> report.

Batching and exactness. DAC's convolutions see zeros past the end of a signal only when the
signal really ends there: zero-padding a shorter item to a longer one in the same batch
changes the codes of its last few frames (measured: the last ~4 of 20 frames differ). So the
default ``bucket="exact"`` only batches items with the same frame count ``ceil(n / hop)``
(after right-padding each item to a multiple of the hop, as the original ``preprocess``
does): the codes are then bit-for-bit those of encoding each file alone. Datasets of
fixed-length clips batch fully; for variable-length material ``bucket="pad"`` batches
neighbours in sorted order, pads to the longest and trims codes to ``ceil(n / hop)`` per item
(faster, but the last few frames of shorter items can differ from a solo encode).

Long files: the model tiles long inputs internally with a halo so that codes equal the
whole-file codes and memory is bounded by the tile (``tile_frames`` is passed through when
the model supports it); this module never windows the model itself.

No lost work: outputs are written to a temporary file in the output directory and renamed;
a re-run skips complete outputs; bad inputs are reported (path + reason) and skipped; Ctrl-C
/ SIGTERM finishes in-flight writes and removes temporaries.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import inspect
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import io as aio
from .configuration import PRESETS
from .dacfile import DacFile, DacFileError, load_any

AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64", ".sd2", ".voc", ".htk", ".mat", ".pvf", ".xi",
)
CODE_EXTENSIONS = (".dac", ".json")
FORMATS = ("dac", "npy")
PRESET_NAMES = tuple(PRESETS)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
@dataclass
class Failure:
    path: str
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


@dataclass
class Report:
    """What a run did. ``ok`` is False when any input failed."""

    task: str
    done: list = field(default_factory=list)  # (input, output) pairs written this run
    skipped: list = field(default_factory=list)  # (input, output) pairs already complete
    failures: list = field(default_factory=list)  # Failure
    audio_seconds: float = 0.0  # audio processed this run (original duration)
    wall_seconds: float = 0.0
    model_seconds: float = 0.0  # time inside model.encode/decode

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def files_per_second(self) -> float:
        return len(self.done) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def realtime_factor(self) -> float:
        """Wall time / audio time (< 1 is faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds > 0 else 0.0

    @property
    def speed(self) -> float:
        """Audio seconds per wall second (= audio hours per hour)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"{self.task}: {len(self.done)} written, {len(self.skipped)} skipped (already complete), "
            f"{len(self.failures)} failed; {self.audio_seconds / 3600:.4f} audio hours in "
            f"{self.wall_seconds:.2f} s ({self.files_per_second:.2f} files/s, {self.speed:.2f}x real time, "
            f"RTF {self.realtime_factor:.4f}, model {self.model_seconds:.2f} s)"
        ]
        if self.failures:
            lines.append(f"failed inputs ({len(self.failures)}):")
            lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "task": self.task, "written": len(self.done), "skipped": len(self.skipped),
            "failed": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "audio_seconds": self.audio_seconds, "wall_seconds": self.wall_seconds,
            "model_seconds": self.model_seconds, "files_per_second": self.files_per_second,
            "speed_x_realtime": self.speed, "rtf": self.realtime_factor,
        }


# ----------------------------------------------------------------------------------------------
# model helpers
# ----------------------------------------------------------------------------------------------
def load_model(spec: Any = "44khz", device: str | None = None, dtype: Any = None, *, seed: int = 0, quiet: bool = False):
    """Load a DAC model from ``spec``.

    ``spec``: an already-built model (returned as is, moved to device/dtype); a zero-argument
    callable returning one (called here, so callers can defer loading until needed); a local
    directory (``DacModel.from_pretrained``); an original ``.pth`` checkpoint
    (``DacModel.from_original``); a preset name ``16khz``/``24khz``/``44khz``/``44khz_16kbps``
    (``DacModel.from_preset``: RANDOM weights in the real shapes, for trying the pipeline out -
    a warning says so); anything else is treated as a hub id (``from_pretrained``).
    """
    import torch

    if callable(spec) and not hasattr(spec, "encode") and not isinstance(spec, (str, os.PathLike)):
        spec = spec()  # a zero-argument loader: the model is built only when there is work to do
    if isinstance(spec, torch.nn.Module) or (hasattr(spec, "encode") and hasattr(spec, "config")):
        model = spec
    else:
        spec_s = str(spec)
        DacModel = _dac_model_class()
        p = Path(spec_s).expanduser()
        if spec_s in PRESET_NAMES:
            msg = (f"WARNING: model preset {spec_s!r} has RANDOM weights (seed {seed}) in the real shapes: "
                   "for trying the pipeline out only; codes and audio are meaningless. "
                   "Pass --model with a checkpoint directory, .pth file or hub id for real use.")
            if not quiet:
                print(msg, file=sys.stderr)
            model = DacModel.from_preset(spec_s, seed=seed)
        elif p.is_dir():
            model = DacModel.from_pretrained(str(p))
        elif p.suffix in (".pth", ".pt", ".ckpt"):
            if not p.exists():
                raise FileNotFoundError(f"checkpoint {p} does not exist")
            model = DacModel.from_original(str(p))
        elif p.exists():
            raise ValueError(f"don't know how to load a model from file {p} (expected a directory or .pth)")
        else:
            model = DacModel.from_pretrained(spec_s)
    dev = torch.device(device) if device else None
    dt = parse_dtype(dtype)
    if dev is not None or dt is not None:
        model = model.to(device=dev, dtype=dt)
    model.eval()
    return model


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
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}") from None


def _dac_model_class():
    from .modeling import DacModel

    return DacModel


def model_rate_and_hop(model) -> tuple[int, int]:
    cfg = model.config
    ratios = getattr(cfg, "downsampling_ratios", None)
    hop = int(np.prod(ratios)) if ratios else int(cfg.hop_length)  # hub configs may carry a stale hop
    return int(cfg.sampling_rate), hop


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


# ----------------------------------------------------------------------------------------------
# input expansion
# ----------------------------------------------------------------------------------------------
def expand_inputs(inputs: Iterable[Any], extensions: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[Failure]]:
    """Expand files, directories (recursive) and glob patterns.

    Returns ``([(path, relative output stem base)], failures)``: a directory's files keep
    their path relative to it (so outputs mirror the tree); plain files and glob matches use
    their name. Inputs that match nothing are failures.
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

    for item in inputs if not isinstance(inputs, (str, os.PathLike)) else [inputs]:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in exts
                           and not q.name.startswith(aio.TMP_PREFIX) and not _is_npy_codes(q))
            for q in found:
                if q.suffix.lower() == ".json" and not _json_has_codes(q):
                    continue
                add(q, q.relative_to(p))
        elif p.exists():
            add(p, Path(p.name))
        elif glob.has_magic(s):
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                failures.append(Failure(s, "glob matched no files"))
            for q in files:
                add(q, Path(q.name))
        else:
            failures.append(Failure(s, "no such file or directory"))
    return out, failures


def _is_npy_codes(p: Path) -> bool:
    return p.name.endswith(".codes.npy")


def _json_has_codes(p: Path) -> bool:
    return p.with_name(p.name[: -len(".json")] + ".codes.npy").exists()


# ----------------------------------------------------------------------------------------------
# output naming / completeness
# ----------------------------------------------------------------------------------------------
def encoded_output(output_dir: Path, rel: Path, fmt: str) -> Path:
    """The primary output of encoding ``rel``: ``.dac``, or the ``.json`` (written last) for npy."""
    stem = output_dir / rel.with_suffix("")
    if fmt == "dac":
        return stem.with_name(stem.name + ".dac")
    return stem.with_name(stem.name + ".json")


def _complete(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _encoded_complete(out: Path, fmt: str) -> bool:
    if fmt == "npy":
        return _complete(out) and _complete(out.with_name(out.name[: -len(".json")] + ".codes.npy"))
    return _complete(out)


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, task: str, enabled):
        self.enabled = bool(enabled)
        self.bar = None
        self.t0 = time.perf_counter()
        self.audio_s = 0.0
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=task, unit="file", dynamic_ncols=True, file=sys.stderr)
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, n: int, audio_s: float):
        self.audio_s += audio_s
        if self.bar is not None:
            el = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.audio_s / 3600:.3f} h audio, {self.audio_s / el:.1f}x RT, RTF {el / max(self.audio_s, 1e-9):.3f}",
                                     refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------
@dataclass
class _Item:
    idx: int
    src: Path
    out: Path
    rows: Any = None  # np (rows, samples) for encode / codes (rows, n, frames) for decode
    frames: int = 0
    meta: dict = field(default_factory=dict)


class _Bucketer:
    """Groups loaded items into batches of about ``batch_size`` rows.

    exact: one group per key (frame count); pad: a single group in arrival order (inputs are
    sorted by length, so neighbours are similar). A group is emitted when it reaches
    ``batch_size`` rows; when more than ``max_pending`` rows wait, the largest group is emitted.
    """

    def __init__(self, batch_size: int, exact: bool, max_pending: int):
        self.batch_size = max(1, int(batch_size))
        self.exact = exact
        self.max_pending = max(self.batch_size, max_pending)
        self.groups: "OrderedDict[Any, list[_Item]]" = OrderedDict()
        self.pending = 0

    def add(self, item: _Item) -> list[list[_Item]]:
        key = item.frames if self.exact else 0
        self.groups.setdefault(key, []).append(item)
        self.pending += item.rows.shape[0]
        ready = []
        g = self.groups[key]
        if sum(i.rows.shape[0] for i in g) >= self.batch_size:
            ready.append(self._pop(key))
        while self.pending > self.max_pending and self.groups:
            big = max(self.groups, key=lambda k: sum(i.rows.shape[0] for i in self.groups[k]))
            ready.append(self._pop(big))
        return ready

    def _pop(self, key) -> list[_Item]:
        g = self.groups.pop(key)
        self.pending -= sum(i.rows.shape[0] for i in g)
        return g

    def pop_largest(self) -> list[_Item]:
        if not self.groups:
            return []
        big = max(self.groups, key=lambda k: sum(i.rows.shape[0] for i in self.groups[k]))
        return self._pop(big)

    def flush(self) -> list[list[_Item]]:
        out = [self._pop(k) for k in list(self.groups)]
        return out


def _to_device(x, device):
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# ----------------------------------------------------------------------------------------------
# the generic runner
# ----------------------------------------------------------------------------------------------
def _run(task, jobs, report, load_fn, model_fn, write_fn, *, batch_size, workers, exact, progress,
         size_fn=None, memory_budget=2 << 30):
    """Prefetch (thread pool) -> bucket -> model -> write (thread pool), in input order."""
    n = len(jobs)
    prog = _Progress(n, task, progress)
    workers = max(1, int(workers))
    bucketer = _Bucketer(batch_size, exact, max_pending=4 * max(1, batch_size))
    readers = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dacfast-read")
    writers = cf.ThreadPoolExecutor(max_workers=max(1, min(4, workers)), thread_name_prefix="dacfast-write")
    lock = threading.Lock()
    # bound the results waiting to be written (a fast GPU must not pile decoded audio up in RAM)
    write_slots = threading.Semaphore(max(4, 2 * batch_size))

    def on_written(fut, item):
        write_slots.release()
        exc = fut.exception() if not fut.cancelled() else RuntimeError("cancelled")
        with lock:
            if exc is None:
                report.done.append((str(item.src), str(item.out)))
                report.audio_seconds += item.meta.get("duration", 0.0)
            else:
                report.failures.append(Failure(str(item.src), f"write failed: {exc}"))
            prog.update(1, item.meta.get("duration", 0.0) if exc is None else 0.0)

    def run_batch(batch: list[_Item]):
        t = time.perf_counter()
        try:
            results = model_fn(batch)
        except Exception as exc:  # a model failure on one batch: retry items one by one
            if len(batch) > 1:
                for it in batch:
                    run_batch([it])
                return
            report.failures.append(Failure(str(batch[0].src), f"model failed: {type(exc).__name__}: {exc}"))
            prog.update(1, 0.0)
            return
        finally:
            report.model_seconds += time.perf_counter() - t
        for it, res in zip(batch, results):
            it.rows = None  # free input memory early
            write_slots.acquire()
            fut = writers.submit(write_fn, it, res)
            fut.add_done_callback(lambda f, it=it: on_written(f, it))

    # Bounded prefetch: at most `window` items and about `memory_budget` bytes of decoded audio
    # are loaded ahead of the model (always at least one), so memory follows the batch size and
    # the budget, not the dataset. Long files are never held many at a time.
    window = max(2 * workers, 2 * batch_size)
    outstanding = {"bytes": 0}
    cost: dict[int, int] = {}

    def release(items):
        for it in items:
            outstanding["bytes"] -= cost.pop(it.idx, 0)

    try:
        it_jobs = iter(enumerate(jobs))
        inflight: "OrderedDict[int, cf.Future]" = OrderedDict()
        job_of = {}
        peeked: list = []

        def top_up():
            while len(inflight) < window:
                if not peeked:
                    try:
                        peeked.append(next(it_jobs))
                    except StopIteration:
                        return
                i, job = peeked[0]
                need = int(size_fn(job)) if size_fn else 0
                if outstanding["bytes"] and outstanding["bytes"] + need > memory_budget:
                    return
                peeked.pop()
                cost[i] = need
                outstanding["bytes"] += need
                job_of[i] = job
                inflight[i] = readers.submit(load_fn, i, job)

        while True:
            top_up()
            if not inflight:
                if peeked:  # the budget is held by items waiting in the bucketer: run the largest group
                    batch = bucketer.pop_largest()
                    if batch:
                        run_batch(batch)
                        release(batch)
                        continue
                    outstanding["bytes"] = 0  # nothing pending: let the next (huge) item in
                    continue
                break
            i, fut = inflight.popitem(last=False)
            try:
                item = fut.result()
            except aio.AudioError as exc:
                report.failures.append(Failure(exc.path, exc.reason))
                prog.update(1, 0.0)
                outstanding["bytes"] -= cost.pop(i, 0)
                continue
            except DacFileError as exc:
                report.failures.append(Failure(str(job_of[i][0]), str(exc).split(": ", 1)[-1]))
                prog.update(1, 0.0)
                outstanding["bytes"] -= cost.pop(i, 0)
                continue
            except Exception as exc:
                report.failures.append(Failure(str(job_of[i][0]), f"{type(exc).__name__}: {exc}"))
                prog.update(1, 0.0)
                outstanding["bytes"] -= cost.pop(i, 0)
                continue
            finally:
                job_of.pop(i, None)
            for batch in bucketer.add(item):
                run_batch(batch)
                release(batch)
        for batch in bucketer.flush():
            run_batch(batch)
            release(batch)
    except BaseException:
        # Ctrl-C / SIGTERM / fatal error: stop reading, let in-flight writes finish atomically
        readers.shutdown(wait=False, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
        prog.close()
        raise
    readers.shutdown(wait=True)
    writers.shutdown(wait=True)
    prog.close()


def encode_rows(model, rows: list, frames: list, hop: int, device, dtype, n_quantizers=None, **encode_kwargs):
    """The model step of every encoder (files, Ray actors): zero-pad each item's rows (channels, samples) to
    the longest item's ``frames * hop``, encode all rows in one call, and return each item's codes
    (channels, n_codebooks, its own frames) as int64 numpy arrays."""
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


# ----------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------
def encode_files(
    inputs,
    output_dir,
    model: Any = "44khz",
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
) -> Report:
    """Encode audio files to ``.dac`` (or ``--format npy``) files under ``output_dir``.

    ``inputs``: files, directories (searched recursively for audio extensions) and glob
    patterns. ``model``: a model object or a spec for :func:`load_model`. ``batch_size``
    counts rows (a stereo file is two rows). ``bucket``: "exact" (default) or "pad" (see the
    module docstring). ``normalize_db``: loudness target (None: no normalization).
    ``tile_frames``: passed to the model's encode (its exact tiling of long inputs).
    ``prefetch_memory``: about how many bytes of decoded audio may be loaded ahead of the model
    (at least one file always is). Returns a :class:`Report`; failures do not stop the run.
    """
    import torch

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if bucket not in ("exact", "pad"):
        raise ValueError("bucket must be 'exact' or 'pad'")
    if n_quantizers is not None and hasattr(model, "config"):
        _check_nq(n_quantizers, model)
    t0 = time.perf_counter()
    report = Report(task="encode")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    aio.cleanup_temp_files(output_dir)

    expanded, failures = expand_inputs(inputs, AUDIO_EXTENSIONS)
    report.failures += failures
    jobs = _plan(expanded, output_dir, lambda rel: encoded_output(output_dir, rel, format),
                 lambda out: _encoded_complete(out, format), overwrite, report)
    if not jobs:
        report.wall_seconds = time.perf_counter() - t0
        return report

    model = load_model(model, device, dtype)
    dev, mdtype = _model_device_dtype(model)
    sr, hop = model_rate_and_hop(model)
    nq = None if n_quantizers is None else _check_nq(n_quantizers, model)
    enc_kwargs = {}
    if tile_frames is not None and _accepts(model.encode, "tile_frames"):
        enc_kwargs["tile_frames"] = int(tile_frames)

    # sort by duration from headers (cheap) so equal/similar lengths meet in the bucketer
    def header_len(job):
        try:
            r, _, f = aio.audio_info(job[0])
            return f / r
        except Exception:
            return 0.0

    jobs.sort(key=header_len)

    def size_fn(job):
        # float32 at the source rate and at the model rate, plus pyloudnorm's float64 working copies
        try:
            r, c, f = aio.audio_info(job[0])
        except Exception:
            return 0
        return c * f * 4 * (1 + 3 * max(1.0, sr / r))

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
                           **enc_kwargs)

    def write_fn(it: _Item, codes):
        m = it.meta
        f = DacFile(codes=codes, input_db=np.array([m["input_db"]], np.float32), original_length=m["original_length"],
                    sample_rate=m["sample_rate"], chunk_length=codes.shape[-1], channels=m["channels"], padding=True)
        if format == "dac":
            f.save(it.out)
        else:
            f.extra = {"source": str(it.src), "model_sample_rate": sr, "hop_length": hop}
            f.save_npy(it.out.with_name(it.out.name[: -len(".json")]))

    _run("encode", [(s, o) for s, o in jobs], report, load_fn, model_fn, write_fn,
         batch_size=batch_size, workers=workers, exact=(bucket == "exact"), progress=_want_progress(progress),
         size_fn=size_fn, memory_budget=int(prefetch_memory))
    report.wall_seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
def decode_files(
    inputs,
    output_dir,
    model: Any = "44khz",
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
) -> Report:
    """Decode ``.dac`` (or npy-format ``.json``) files to audio under ``output_dir``.

    Restores the original sample rate (soxr), length and channel count, and the loudness
    (each channel normalized back to the stored ``input_db``, as the original decompress).
    ``format`` is the audio extension (wav, flac, ogg). Items are batched only with items of
    the same frame count, so batched decoding equals decoding each file alone.

    Files written by the original's chunked ``compress`` (``padding=False``, ``chunk_length``
    < frames) are decoded in one pass over all their frames, like our own whole-file codes;
    the original's ``decompress`` decodes such files chunk by chunk without convolution padding
    instead, so the audio near its chunk boundaries differs slightly (its boundary artefacts,
    upstream issue #39, are not reproduced). Length, rate, channels and loudness are restored
    the same way.
    """
    import torch

    fmt = format.lstrip(".").lower()
    if fmt in FORMATS:  # "dac"/"npy" are encode formats: the audio format defaults to wav
        fmt = "wav"
    t0 = time.perf_counter()
    report = Report(task="decode")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    aio.cleanup_temp_files(output_dir)
    expanded, failures = expand_inputs(inputs, CODE_EXTENSIONS)
    report.failures += failures
    jobs = _plan(expanded, output_dir, lambda rel: (output_dir / rel).with_suffix("." + fmt), _complete, overwrite, report)
    if not jobs:
        report.wall_seconds = time.perf_counter() - t0
        return report

    model = load_model(model, device, dtype)
    dev, mdtype = _model_device_dtype(model)
    sr, hop = model_rate_and_hop(model)
    n_cb = int(getattr(model.config, "n_codebooks", 0)) or None
    cb_size = int(getattr(model.config, "codebook_size", 1024))
    dec_kwargs = {}
    if tile_frames is not None and _accepts(model.decode, "tile_frames"):
        dec_kwargs["tile_frames"] = int(tile_frames)

    def load_fn(i, job):
        src, out = job
        f = load_any(src)
        codes = f.codes.astype(np.int64)
        if n_quantizers is not None:
            codes = codes[:, : int(n_quantizers)]
        if n_cb is not None and codes.shape[1] > n_cb:
            raise DacFileError(f"{src}: has {codes.shape[1]} codebooks, the model has {n_cb}")
        if codes.size and codes.max() >= cb_size:
            raise DacFileError(f"{src}: code {int(codes.max())} >= codebook size {cb_size}")
        if codes.shape[0] != f.channels:
            raise DacFileError(f"{src}: codes have {codes.shape[0]} rows but channels={f.channels}")
        if codes.shape[-1] == 0:
            raise DacFileError(f"{src}: no frames")
        msr, mhop = f.extra.get("model_sample_rate"), f.extra.get("hop_length")
        if (msr is not None and int(msr) != sr) or (mhop is not None and int(mhop) != hop):
            raise DacFileError(f"{src}: encoded by a {msr} Hz / hop {mhop} model, decoding model is {sr} Hz / hop {hop}")
        return _Item(i, src, out, rows=codes, frames=codes.shape[-1],
                     meta=dict(f=f, duration=f.original_length / f.sample_rate, ncb=codes.shape[1]))

    def model_fn(batch: list[_Item]):
        # exact bucketing groups by frame count; also split by codebook count
        groups: dict[int, list[_Item]] = {}
        for it in batch:
            groups.setdefault(it.rows.shape[1], []).append(it)
        outs = {}
        for _, items in groups.items():
            codes = torch.from_numpy(np.concatenate([it.rows for it in items], 0))
            with torch.inference_mode():
                out = model.decode(audio_codes=_to_device(codes, dev), return_dict=True, **dec_kwargs)
            audio = out.audio_values if hasattr(out, "audio_values") else out[0]
            audio = _as_numpy(audio.reshape(audio.shape[0], -1))
            r = 0
            for it in items:
                c = it.rows.shape[0]
                outs[it.idx] = audio[r:r + c]
                r += c
        return [outs[it.idx] for it in batch]

    def write_fn(it: _Item, audio):
        f: DacFile = it.meta["f"]
        y = aio.restore_after_decoding(audio, sr, f.input_db, f.sample_rate, f.original_length, f.channels)
        aio.write_audio(it.out, y, f.sample_rate)

    _run("decode", jobs, report, load_fn, model_fn, write_fn, batch_size=batch_size, workers=workers,
         exact=True, progress=_want_progress(progress))
    report.wall_seconds = time.perf_counter() - t0
    return report


def _check_nq(n_quantizers, model) -> int:
    nq = int(n_quantizers)
    n_cb = int(getattr(model.config, "n_codebooks", 0)) or None
    if nq < 1 or (n_cb is not None and nq > n_cb):
        raise ValueError(f"n_quantizers must be in 1..{n_cb}, got {nq}")
    return nq


def _plan(expanded, output_dir, out_of, complete, overwrite, report):
    jobs, claimed = [], {}
    for src, rel in expanded:
        out = out_of(rel)
        key = os.path.abspath(out)
        if key in claimed:
            report.failures.append(Failure(str(src), f"output {out} already claimed by {claimed[key]} (same name, different extension?)"))
            continue
        claimed[key] = str(src)
        if not overwrite and complete(out):
            report.skipped.append((str(src), str(out)))
            continue
        jobs.append((src, out))
    return jobs


def _want_progress(progress):
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def info(path) -> dict:
    """Metadata of a ``.dac`` / npy-format file, as a dict (for ``dac-fast info``)."""
    f = load_any(path)
    return {
        "path": str(path), "dac_version": f.dac_version, "channels": f.channels,
        "n_codebooks": f.n_codebooks, "frames": f.frames, "chunk_length": f.chunk_length,
        "padding": f.padding, "sample_rate": f.sample_rate, "original_length": f.original_length,
        "duration_seconds": round(f.duration, 6), "input_db": [round(float(v), 3) for v in f.input_db],
        "codes_dtype": str(f.codes.dtype), "codes_shape": list(f.codes.shape),
        "code_range": [int(f.codes.min()), int(f.codes.max())] if f.codes.size else None,
    }
