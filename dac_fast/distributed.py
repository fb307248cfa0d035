"""Encode datasets beyond one machine with Ray Data: :func:`encode_dataset`.

Optional extra: ``pip install .[ray]`` (``ray[data]``, ``pyarrow``). Nothing here is imported by
the rest of dac_fast; ``import ray`` happens inside the functions.

Pipeline (one Ray Data dataset, streamed)::

    inputs (paths/globs/dirs on a filesystem every node sees, or a ray.data.Dataset)
      -> read + resample + loudness   CPU tasks (``map``), dac_fast.io -- same as dac_fast.batch
      -> encode                       actor pool (class ``map_batches``): the model is loaded once
                                      per actor, one GPU each (``num_gpus_per_worker``) or CPU
                                      with a fractional ``num_cpus`` so readers are never starved
      -> write                        CPU tasks: one Parquet shard per batch (atomic), optional
                                      ``.dac`` file per input (DacFile, atomic)
      -> driver                       only small status rows -> manifest.parquet, errors.parquet

Output directory layout::

    OUTPUT/shards/part-*.parquet   path, sample_rate, original_length, channels, n_codebooks,
                                   frames, codes (binary: uint16 little-endian, C order,
                                   shape (channels, n_codebooks, frames)), input_db (list<float>)
    OUTPUT/dac/<mirrored tree>.dac one per input when ``write_dac=True`` (original DACFile format)
    OUTPUT/manifest.parquet        completed inputs: path, shard, channels, frames, duration
    OUTPUT/errors.parquet          failed inputs of the latest run: path, reason
    OUTPUT/run.json                model rate / hop / codebooks (a resume with another model is refused)

Exactness: items are batched only with items of the same frame count (``bucket="exact"`` of
dac_fast.batch), padded to a multiple of the hop exactly as ``encode_files`` does, so codes
equal the single-machine path bit for bit.

Faults: Ray retries read/write tasks (``max_retries``) and restarts encoder actors
(``max_restarts``, with ``max_task_retries``). On top of that every input ends up either in a
shard (completed) or in the errors table: unreadable / corrupt / NaN audio and model failures
are caught per input; inputs of a block that Ray gave up on (a worker crashing on it past the
retries) are listed as ``lost``. Shards are the source of truth for completion and are written
atomically, so re-running with the same ``output`` skips completed inputs and retries the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import io as aio
from .batch import (AUDIO_EXTENSIONS, Failure, Report, _check_nq, encoded_output, expand_inputs,
                    load_model, model_rate_and_hop)
from .dacfile import DacFile

SHARDS_DIR = "shards"
DAC_DIR = "dac"
MANIFEST = "manifest.parquet"
ERRORS = "errors.parquet"
RUN_INFO = "run.json"
SHARD_COLUMNS = ("path", "sample_rate", "original_length", "channels", "n_codebooks", "frames", "codes", "input_db")
CRASH_ENV = "DAC_FAST_TEST_CRASH_ON"  # tests only: read workers die on paths containing this value
AUDIO_COLUMNS = ("audio", "bytes", "amplitude")  # accepted audio columns of a user Dataset, in this order


# ----------------------------------------------------------------------------------------------
# reading results
# ----------------------------------------------------------------------------------------------
def codes_from_row(row: dict) -> np.ndarray:
    """The uint16 codes array (channels, n_codebooks, frames) of one shard row."""
    shape = (int(row["channels"]), int(row["n_codebooks"]), int(row["frames"]))
    return np.frombuffer(row["codes"], dtype="<u2").reshape(shape)


def read_codes(output) -> dict:
    """``{path: codes (channels, n_codebooks, frames) uint16}`` for every completed input."""
    pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

    out = {}
    for shard in _shard_files(Path(output)):
        for row in pq.read_table(shard).to_pylist():
            out[row["path"]] = codes_from_row(row)
    return out


def read_manifest(output) -> list[dict]:
    p = Path(output) / MANIFEST
    if not p.exists():
        return []
    pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

    return pq.read_table(p).to_pylist()


def read_errors(output) -> list[dict]:
    """Rows ``{"path", "reason"}`` of the latest run's failed inputs."""
    p = Path(output) / ERRORS
    if not p.exists():
        return []
    pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

    return pq.read_table(p).to_pylist()


def _shard_files(output: Path) -> list[Path]:
    d = output / SHARDS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("part-*.parquet") if not p.name.startswith(aio.TMP_PREFIX))


def _completed(output: Path) -> dict:
    """Scan shards (only the small columns): ``{path: manifest row}``. Shards are atomic."""
    pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

    done = {}
    for shard in _shard_files(output):
        try:
            t = pq.read_table(shard, columns=["path", "channels", "frames", "sample_rate", "original_length"])
        except Exception:  # unreadable shard (should not happen: atomic writes): redo its inputs
            continue
        for r in t.to_pylist():
            done[r["path"]] = {"path": r["path"], "shard": shard.name, "channels": r["channels"],
                               "frames": r["frames"], "duration": r["original_length"] / max(r["sample_rate"], 1)}
    return done


# ----------------------------------------------------------------------------------------------
# stage 1: read + resample + loudness (CPU tasks)
# ----------------------------------------------------------------------------------------------
class _Reader:
    """Row function: input row -> prepared audio at the model rate (or an error)."""

    def __init__(self, model_rate: int, hop: int, normalize_db, audio_column=None):
        self.sr, self.hop, self.normalize_db, self.audio_column = model_rate, hop, normalize_db, audio_column

    def __call__(self, row: dict) -> dict:
        path = str(row.get("path", ""))
        crash = os.environ.get(CRASH_ENV)
        if crash and crash in path:  # fault injection for tests: the worker process dies
            os._exit(1)
        out = {"path": path, "rel": str(row.get("rel") or ""), "audio": b"", "channels": 0, "samples": 0,
               "sample_rate": 0, "original_length": 0, "input_db": 0.0, "frames": 0, "error": ""}
        try:
            audio, in_sr = self._load(row, path)
            channels, n = audio.shape
            x, input_db = aio.prepare_for_encoding(audio, in_sr, self.sr, self.normalize_db)
            frames = math.ceil(x.shape[-1] / self.hop)
            if frames == 0:
                raise aio.AudioError(path, "audio too short to encode")
            out.update(audio=np.ascontiguousarray(x, dtype="<f4").tobytes(), channels=int(channels),
                       samples=int(x.shape[-1]), sample_rate=int(in_sr), original_length=int(n),
                       input_db=float(input_db), frames=int(frames))
        except aio.AudioError as exc:
            out["error"] = exc.reason
        except Exception as exc:  # never let one input fail the block: it goes to the errors table
            out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def _load(self, row: dict, path: str):
        col = self.audio_column or next((c for c in AUDIO_COLUMNS if c in row), None)
        if col is None:  # paths mode: read the file from the shared filesystem
            return aio.read_audio(path)
        value = row[col]
        if isinstance(value, (bytes, bytearray, memoryview)):  # encoded file bytes (read_binary_files)
            suffix = Path(path).suffix if Path(path).suffix else ".audio"
            with tempfile.TemporaryDirectory(prefix="dacfast-ray-") as d:
                tmp = Path(d) / ("input" + suffix)
                tmp.write_bytes(bytes(value))
                try:
                    return aio.read_audio(tmp)
                except aio.AudioError as exc:
                    raise aio.AudioError(path, exc.reason) from None
        # decoded samples: (channels, samples) or (samples,) plus a sample_rate column
        if "sample_rate" not in row:
            raise aio.AudioError(path, f"column {col!r} holds samples but the dataset has no 'sample_rate' column")
        audio = np.asarray(value, dtype=np.float32)
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2 or audio.size == 0:
            raise aio.AudioError(path, f"audio array has shape {audio.shape}; expected (channels, samples)")
        if not np.isfinite(audio).all():
            raise aio.AudioError(path, f"audio contains {int((~np.isfinite(audio)).sum())} NaN/Inf samples")
        return np.ascontiguousarray(audio), int(row["sample_rate"])


# ----------------------------------------------------------------------------------------------
# stage 2: encode (actor pool; the model is loaded once per actor)
# ----------------------------------------------------------------------------------------------
class _Encoder:
    def __init__(self, model, device=None, dtype=None, seed=0, n_quantizers=None, tile_frames=None, threads=None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not str(device).startswith("cuda"):
            from .cli import tune_allocator  # glibc mallopt: large CPU temporaries stop page-faulting

            tune_allocator()
        if str(device).startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = False  # exact parity (FACTS: TF32 off)
            torch.backends.cudnn.allow_tf32 = False
        self.model = load_model(model, device, dtype, seed=seed, quiet=True)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.sr, self.hop = model_rate_and_hop(self.model)
        self.nq = None if n_quantizers is None else _check_nq(n_quantizers, self.model)
        self.kw = {}
        if tile_frames is not None:
            from .batch import _accepts

            if _accepts(self.model.encode, "tile_frames"):
                self.kw["tile_frames"] = int(tile_frames)

    def _encode_group(self, rows: list[np.ndarray], frames: int) -> list[np.ndarray]:
        """encode_files' model step, on items of one frame count."""
        from .batch import encode_rows

        return encode_rows(self.model, rows, [frames] * len(rows), self.hop, self.device, self.dtype, self.nq,
                           **self.kw)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        errors = [str(e) for e in batch["error"]]
        codes_out = [b""] * n
        ncb = [0] * n
        secs = [0.0] * n
        groups: dict[int, list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault(int(batch["frames"][i]), []).append(i)
        for frames, idx in groups.items():
            arrays = [np.frombuffer(batch["audio"][i], dtype="<f4").reshape(int(batch["channels"][i]), int(batch["samples"][i]))
                      for i in idx]
            for sub_idx, sub_arrays in self._run(idx, arrays, frames, errors, secs):
                for i, c in zip(sub_idx, sub_arrays):
                    codes_out[i] = np.ascontiguousarray(c.astype("<u2")).tobytes()
                    ncb[i] = int(c.shape[1])
        out = {k: batch[k] for k in ("path", "rel", "channels", "sample_rate", "original_length", "input_db", "frames")}
        out["n_codebooks"] = np.asarray(ncb, dtype=np.int32)
        out["codes"] = np.array(codes_out, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["encode_seconds"] = np.asarray(secs, dtype=np.float64)
        return out

    def _run(self, idx, arrays, frames, errors, secs):
        t = time.perf_counter()
        try:
            res = self._encode_group(arrays, frames)
        except Exception as exc:
            if len(idx) > 1:  # a failure on a group: retry items one by one, fail only the culprit
                for i, a in zip(idx, arrays):
                    yield from self._run([i], [a], frames, errors, secs)
                return
            errors[idx[0]] = f"model failed: {type(exc).__name__}: {exc}"[:500]
            return
        dt = (time.perf_counter() - t) / len(idx)
        for i in idx:
            secs[i] = dt
        yield idx, res


# ----------------------------------------------------------------------------------------------
# stage 3: write shards (+ .dac files) (CPU tasks); only status rows go back to the driver
# ----------------------------------------------------------------------------------------------
class _Writer:
    def __init__(self, output: str, write_dac: bool, model_rate: int, hop: int):
        self.output, self.write_dac, self.sr, self.hop = Path(output), write_dac, model_rate, hop

    def __call__(self, batch: dict) -> dict:
        pa = aio.require("pyarrow", "the Ray engine's Parquet shards")
        pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

        n = len(batch["path"])
        errors = [str(e) for e in batch["error"]]
        for i in range(n):
            if errors[i] or not self.write_dac:
                continue
            try:
                c = int(batch["channels"][i])
                codes = np.frombuffer(batch["codes"][i], dtype="<u2").reshape(c, int(batch["n_codebooks"][i]), -1)
                f = DacFile(codes=codes, input_db=np.array([batch["input_db"][i]], np.float32),
                            original_length=int(batch["original_length"][i]), sample_rate=int(batch["sample_rate"][i]),
                            chunk_length=codes.shape[-1], channels=c, padding=True)
                f.save(encoded_output(self.output / DAC_DIR, Path(str(batch["rel"][i])), "dac"))
            except Exception as exc:
                errors[i] = f"write failed: {type(exc).__name__}: {exc}"[:500]
        ok = [i for i in range(n) if not errors[i]]
        shard = ""
        if ok:
            # named by its content: a retried write task replaces its own shard instead of adding a duplicate
            digest = hashlib.sha1("\0".join(sorted(str(batch["path"][i]) for i in ok)).encode()).hexdigest()[:24]
            shard = f"part-{digest}.parquet"
            table = pa.table({
                "path": pa.array([str(batch["path"][i]) for i in ok], pa.string()),
                "sample_rate": pa.array([int(batch["sample_rate"][i]) for i in ok], pa.int32()),
                "original_length": pa.array([int(batch["original_length"][i]) for i in ok], pa.int64()),
                "channels": pa.array([int(batch["channels"][i]) for i in ok], pa.int32()),
                "n_codebooks": pa.array([int(batch["n_codebooks"][i]) for i in ok], pa.int32()),
                "frames": pa.array([int(batch["frames"][i]) for i in ok], pa.int32()),
                "codes": pa.array([bytes(batch["codes"][i]) for i in ok], pa.binary()),
                "input_db": pa.array([[float(batch["input_db"][i])] for i in ok], pa.list_(pa.float32())),
            })
            try:
                with aio.atomic_path(self.output / SHARDS_DIR / shard) as tmp:
                    pq.write_table(table, str(tmp))
            except Exception as exc:
                for i in ok:
                    errors[i] = f"shard write failed: {type(exc).__name__}: {exc}"[:500]
                shard = ""
        return {
            "path": np.array([str(p) for p in batch["path"]], dtype=object),
            "error": np.array(errors, dtype=object),
            "shard": np.array([shard if not errors[i] else "" for i in range(n)], dtype=object),
            "channels": np.asarray(batch["channels"], dtype=np.int64),
            "frames": np.asarray(batch["frames"], dtype=np.int64),
            "duration": np.asarray(batch["original_length"], dtype=np.float64)
            / np.maximum(np.asarray(batch["sample_rate"], dtype=np.float64), 1.0),
            "encode_seconds": np.asarray(batch["encode_seconds"], dtype=np.float64),
        }


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def worker_runtime_env(runtime_env: dict | None = None, local: bool = True) -> dict:
    """A runtime_env that lets Ray workers import dac_fast.

    If dac_fast is installed as a distribution (``pip install .[ray]`` on every node) nothing is
    added. Otherwise a local Ray gets ``PYTHONPATH`` pointing at this checkout and a remote
    cluster gets ``py_modules=[dac_fast]`` (the package is uploaded; its compiled extension
    must match the workers' platform).
    """
    env = dict(runtime_env or {})
    try:
        from importlib.metadata import distribution

        distribution("dac_fast")
        return env
    except Exception:
        pass
    pkg = Path(__file__).resolve().parent
    if local:
        ev = dict(env.get("env_vars", {}))
        ev["PYTHONPATH"] = os.pathsep.join(p for p in (str(pkg.parent), os.environ.get("PYTHONPATH", "")) if p)
        env["env_vars"] = ev
    else:
        env.setdefault("py_modules", [str(pkg)])
    return env


def _model_info(model, seed, dtype):
    """(model_rate, hop, n_codebooks, picklable spec, object with .config) for the driver.

    Presets and model directories only need their config (no weights are built on the driver);
    other specs (.pth, hub ids) are loaded once on CPU to read it."""
    from types import SimpleNamespace

    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        holder = None
        try:
            from .batch import PRESET_NAMES
            from .configuration import DacConfig

            if spec in PRESET_NAMES:
                holder = SimpleNamespace(config=DacConfig.from_preset(spec))
            elif (Path(spec).expanduser() / "config.json").is_file():
                holder = SimpleNamespace(config=DacConfig.from_pretrained(Path(spec).expanduser()))
        except Exception:
            holder = None
        if holder is None:
            holder = load_model(spec, "cpu", dtype, seed=seed, quiet=True)
    else:
        spec = holder = model
    sr, hop = model_rate_and_hop(holder)
    return sr, hop, int(getattr(holder.config, "n_codebooks", 0)) or None, spec, holder


def encode_dataset(
    inputs,
    output,
    model: Any = "44khz",
    *,
    batch_size: int = 8,
    num_gpus_per_worker: float = 0,
    concurrency: int | tuple = 1,
    num_cpus_per_worker: float | None = None,
    threads_per_worker: int | None = None,
    read_num_cpus: float = 1,
    n_quantizers: int | None = None,
    write_dac: bool = False,
    normalize_db: float | None = -16.0,
    device: str | None = None,
    dtype: Any = None,
    tile_frames: int | None = None,
    seed: int = 0,
    files_per_shard: int | None = None,
    files_per_block: int = 16,
    audio_column: str | None = None,
    address: str | None = None,
    runtime_env: dict | None = None,
    max_retries: int = 3,
    max_restarts: int = 3,
    max_errored_blocks: int = -1,
    progress: bool | None = None,
) -> Report:
    """Encode a corpus on a Ray cluster (or a local Ray); returns a dac_fast.batch ``Report``.

    ``inputs``: files, directories (recursive) and glob patterns on a filesystem every node
    sees, or a ``ray.data.Dataset`` with a ``path`` column (the input's id, used for resume)
    and an audio column: ``audio``/``bytes`` holding encoded file bytes (e.g.
    ``ray.data.read_binary_files(..., include_paths=True)``) or ``audio``/``amplitude`` holding
    samples (channels, samples) with a ``sample_rate`` column.
    ``output``: a directory every node sees (layout in the module docstring).
    ``model``: a spec for :func:`dac_fast.batch.load_model` (directory, .pth, hub id, preset)
    loaded once per actor, or a model object (pickled to the actors).
    ``batch_size``: inputs per actor call (items of equal frame count are encoded together).
    ``num_gpus_per_worker``: GPUs per encoder actor (0: CPU actors). ``concurrency``: number of
    encoder actors (int, or Ray's ``(min, max)`` autoscaling tuple).
    ``num_cpus_per_worker``: CPUs reserved per actor (default 1 with GPUs, 0.5 on CPU so read
    tasks always get a CPU); ``threads_per_worker``: torch threads per actor (default
    ``max(1, round(num_cpus_per_worker))``).
    ``read_num_cpus``: CPUs per read task. ``device``/``dtype``: the actors' torch device (default
    ``cuda`` with GPUs, else ``cpu``) and precision (float32 default; others change codes).
    ``write_dac``: also write ``OUTPUT/dac/<tree>.dac`` per input. ``files_per_shard``: rows per
    Parquet shard (default ``batch_size``). ``files_per_block``: inputs per read block (smaller
    spreads reading wider; a crash past the retries loses one block, listed as lost).
    ``address``: for ``ray.init`` when Ray is not initialized yet (None: Ray's default lookup,
    else a new local Ray; "auto"; "local"; "ray://host:10001").
    ``runtime_env``: for a Ray started here (default: whatever lets workers import dac_fast, see
    :func:`worker_runtime_env`). ``max_retries``/``max_restarts``: Ray task retries / actor restarts.
    ``max_errored_blocks``: blocks Ray may give up on (-1: any) -- their inputs are listed as
    lost in the errors table and retried by the next run.
    """
    ray = aio.require("ray", "the Ray engine (--ray)")
    aio.require("ray.data", "the Ray engine (--ray)")

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    report = Report(task="encode (ray)")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    (output / SHARDS_DIR).mkdir(exist_ok=True)
    if n_quantizers is not None and not isinstance(model, (str, os.PathLike)):
        _check_nq(n_quantizers, model)

    # ---- model facts (rate, hop) on the driver; refuse resuming with another model
    sr, hop, n_cb, spec, m = _model_info(model, seed, dtype)
    if n_quantizers is not None:
        _check_nq(n_quantizers, m)
    del m
    info = {"model_sample_rate": sr, "hop_length": hop, "n_codebooks": n_cb, "n_quantizers": n_quantizers,
            "normalize_db": normalize_db, "model": spec if isinstance(spec, str) else type(spec).__name__}
    info_path = output / RUN_INFO
    if info_path.exists():
        prev = json.loads(info_path.read_text())
        diff = {k: (prev.get(k), info[k]) for k in ("model_sample_rate", "hop_length", "n_codebooks", "n_quantizers", "normalize_db")
                if prev.get(k) != info[k]}
        if diff and _shard_files(output):
            raise ValueError(f"{output} holds codes from a different setup {diff}; use another output directory")
    aio.atomic_write_text(info_path, json.dumps(info, indent=1))
    aio.cleanup_temp_files(output)

    # ---- what is done already (shards are the source of truth)
    done = _completed(output)
    prev_errors = {r["path"]: r["reason"] for r in read_errors(output)}

    started = False
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=worker_runtime_env(runtime_env, local=address in (None, "local")),
                 include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        started = True
    try:
        gpus = float(num_gpus_per_worker or 0)
        cpus = num_cpus_per_worker if num_cpus_per_worker is not None else (1.0 if gpus > 0 else 0.5)
        _check_resources(ray.cluster_resources(), concurrency, cpus, gpus, read_num_cpus)
        ctx = ray.data.DataContext.get_current()
        # with a path list we know every input and list those of dropped blocks as lost; for a
        # user Dataset we do not, so a block Ray gives up on fails the run (resume continues it)
        ctx.max_errored_blocks = max_errored_blocks if not isinstance(inputs, ray.data.Dataset) else 0
        if progress is not None:
            ctx.enable_progress_bars = bool(progress)

        # ---- the input dataset
        attempted: list[str] | None = None
        if isinstance(inputs, ray.data.Dataset):
            if "path" not in (inputs.schema().names if inputs.schema() else []):
                raise ValueError("an input Dataset needs a 'path' column (the id used for resume and errors)")
            done_paths = set(done)
            ds = inputs.filter(lambda r: str(r["path"]) not in done_paths) if done_paths else inputs
            if write_dac:
                ds = ds.map(_add_rel)
        else:
            expanded, failures = expand_inputs(inputs, AUDIO_EXTENSIONS)
            report.failures += failures
            items, claimed = [], {}
            for src, rel in expanded:
                key = os.path.abspath(src)
                out_key = str(rel.with_suffix(""))
                if write_dac and out_key in claimed:
                    report.failures.append(Failure(key, f"output {out_key}.dac already claimed by {claimed[out_key]}"))
                    continue
                claimed[out_key] = key
                if key in done:
                    report.skipped.append((key, done[key]["shard"]))
                    continue
                items.append({"path": key, "rel": str(rel)})
            attempted = [it["path"] for it in items]
            if not items:
                report.wall_seconds = time.perf_counter() - t0
                _finish(output, done, report.failures, report, prev_errors, attempted)
                return report
            total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            n_blocks = max(1, min(len(items), max(math.ceil(len(items) / max(1, files_per_block)), 2 * total_cpus)))
            ds = ray.data.from_items(items, override_num_blocks=n_blocks)

        # ---- stage 1: CPU read tasks
        ds = _call(ds.map, dict(num_cpus=read_num_cpus), dict(max_retries=max_retries),
                   _Reader(sr, hop, normalize_db, audio_column))

        # ---- stage 2: encoder actor pool
        threads = threads_per_worker or max(1, int(round(cpus)))
        if isinstance(concurrency, (tuple, list)):
            pool = ray.data.ActorPoolStrategy(min_size=int(concurrency[0]), max_size=int(concurrency[-1]))
        else:
            pool = ray.data.ActorPoolStrategy(size=int(concurrency))
        ds = _call(ds.map_batches,
                   dict(fn_constructor_kwargs=dict(model=spec, device=device or ("cuda" if gpus > 0 else "cpu"),
                                                   dtype=dtype, seed=seed, n_quantizers=n_quantizers,
                                                   tile_frames=tile_frames, threads=threads),
                        batch_size=batch_size, batch_format="numpy", compute=pool,
                        num_gpus=gpus if gpus > 0 else None, num_cpus=cpus),
                   dict(max_restarts=max_restarts, max_task_retries=max_restarts), _Encoder)

        # ---- stage 3: writer tasks; only status rows come back
        ds = _call(ds.map_batches, dict(batch_size=files_per_shard or batch_size, batch_format="numpy", num_cpus=0.25),
                   dict(max_retries=max_retries), _Writer(str(output), write_dac, sr, hop))
        results = []
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            for i in range(len(batch["path"])):
                results.append({k: batch[k][i] for k in batch})
    finally:
        if started:
            ray.shutdown()

    seen = set()
    for r in results:
        path = str(r["path"])
        seen.add(path)
        if r["error"]:
            report.failures.append(Failure(path, str(r["error"])))
        else:
            report.done.append((path, str(r["shard"])))
            report.audio_seconds += float(r["duration"])
            report.model_seconds += float(r["encode_seconds"])
            done[path] = {"path": path, "shard": str(r["shard"]), "channels": int(r["channels"]),
                          "frames": int(r["frames"]), "duration": float(r["duration"])}
    if attempted is not None:
        for path in attempted:
            if path not in seen:
                report.failures.append(Failure(path, "lost: Ray gave up on its block after retries (worker crash?); "
                                                     "re-run to retry"))
    report.wall_seconds = time.perf_counter() - t0
    _finish(output, done, report.failures, report, prev_errors, attempted if attempted is not None else list(seen))
    return report


def _check_resources(res: dict, concurrency, cpus: float, gpus: float, read_cpus: float):
    """Refuse configurations that cannot make progress (FACTS: actors holding every CPU starve the
    read tasks and the job hangs). Judged on the cluster as it is now (an autoscaler may add nodes
    later: then start the job with fewer actors, or an autoscaling ``concurrency=(min, max)``)."""
    n = int(concurrency[0] if isinstance(concurrency, (tuple, list)) else concurrency)
    if n < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    total_cpus, total_gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpus > 0 and n * gpus > total_gpus + 1e-9:
        raise ValueError(f"{n} encoder workers x {gpus:g} GPU need {n * gpus:g} GPUs; the cluster has {total_gpus:g}")
    if total_cpus - n * cpus < min(read_cpus, total_cpus) - 1e-9:
        raise ValueError(
            f"{n} encoder workers x {cpus:g} CPU leave {max(total_cpus - n * cpus, 0):g} of the cluster's "
            f"{total_cpus:g} CPUs for read tasks that need {read_cpus:g}: the job would hang. Lower concurrency "
            f"or num_cpus_per_worker (fractions are fine), or read_num_cpus")


def _call(method, kwargs: dict, retry_kwargs: dict, fn):
    """``method(fn, **kwargs, **retry_kwargs)``; Ray >= 2.60 deprecates passing ``ray.remote`` options
    (max_retries, max_restarts) as keyword arguments and has no named replacement yet: keep them
    (silencing the deprecation warning) and fall back to Ray's defaults where they are refused."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        try:
            return method(fn, **kwargs, **retry_kwargs)
        except TypeError:
            return method(fn, **kwargs)


def _add_rel(row: dict) -> dict:
    p = Path(str(row["path"]))
    row["rel"] = str(Path(*[x for x in p.parts if x not in (p.anchor, "..")]))
    return row


def _finish(output: Path, done: dict, failures, report, prev_errors: dict, attempted):
    """Write manifest.parquet (all completed inputs) and errors.parquet (inputs not completed)."""
    pa = aio.require("pyarrow", "the Ray engine's Parquet shards")
    pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

    rows = sorted(done.values(), key=lambda r: r["path"])
    man = pa.table({
        "path": pa.array([r["path"] for r in rows], pa.string()),
        "shard": pa.array([r["shard"] for r in rows], pa.string()),
        "channels": pa.array([int(r["channels"]) for r in rows], pa.int32()),
        "frames": pa.array([int(r["frames"]) for r in rows], pa.int32()),
        "duration": pa.array([float(r["duration"]) for r in rows], pa.float64()),
    })
    with aio.atomic_path(output / MANIFEST) as tmp:
        pq.write_table(man, str(tmp))
    errs = {f.path: f.reason for f in failures}
    attempted = set(attempted or [])
    for path, reason in prev_errors.items():  # earlier failures not retried this run stay listed
        if path not in errs and path not in done and path not in attempted:
            errs[path] = reason
    et = pa.table({"path": pa.array(sorted(errs), pa.string()),
                   "reason": pa.array([errs[p] for p in sorted(errs)], pa.string())})
    with aio.atomic_path(output / ERRORS) as tmp:
        pq.write_table(et, str(tmp))


# ----------------------------------------------------------------------------------------------
# CLI hook (wired into dac_fast.cli by its owner)
# ----------------------------------------------------------------------------------------------
def add_ray_arguments(parser) -> None:
    """Add ``--ray [ADDRESS]`` and the Ray options to the ``dac-fast encode`` parser."""
    g = parser.add_argument_group("distributed encoding on Ray (pip install .[ray])")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="encode with Ray Data. No ADDRESS: Ray's default (RAY_ADDRESS, else the cluster "
                        "this node joined with `ray start`, else a new local Ray); 'auto': require a running "
                        "cluster; 'local': always a new local Ray; or ray://HOST:10001. Output: Parquet "
                        "shards + manifest + errors table under OUTDIR (--format dac also writes .dac files)")
    g.add_argument("--ray-workers", type=int, default=1, metavar="N", help="encoder actors (default: %(default)s)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per encoder actor (default: 1 if the cluster has GPUs, else 0 = CPU actors)")
    g.add_argument("--ray-cpus-per-worker", type=float, default=None, metavar="C",
                   help="CPUs reserved per encoder actor (default: 1 with GPUs, 0.5 without)")


def run_from_cli(args) -> int:
    """Run ``dac-fast encode --ray [ADDRESS] ...`` from parsed args; returns the exit status.

    Uses the Ray this process is already connected to, else ``ray.init(ADDRESS)`` (no ADDRESS:
    Ray's default lookup; 'auto': a running cluster; 'local': a new local Ray with all CPUs).
    ``--format dac`` writes .dac files next to the Parquet shards, ``--format npy`` only the
    shards. ``--overwrite`` is refused (use a new OUTDIR).
    """
    import sys

    ray = aio.require("ray", "the Ray engine (--ray)")

    if getattr(args, "overwrite", False):
        print("dac-fast: --overwrite is not supported with --ray (completed inputs are kept); "
              "use a new output directory", file=sys.stderr)
        return 2
    for name in ("batch_size", "ray_workers"):
        if getattr(args, name) < 1:
            print(f"dac-fast: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    address = args.ray or None
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, runtime_env=worker_runtime_env(None, local=address in (None, "local")),
                     include_dashboard=False, log_to_driver=False)
        except ConnectionError as exc:
            print(f"dac-fast: cannot connect to Ray at {args.ray!r} ({exc}); start a cluster with `ray start "
                  "--head` or use --ray local", file=sys.stderr)
            return 2
        started = True
    try:
        gpus = args.ray_gpus_per_worker
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        report = encode_dataset(
            args.inputs, args.output_dir, args.model, batch_size=args.batch_size, num_gpus_per_worker=gpus,
            concurrency=args.ray_workers, num_cpus_per_worker=args.ray_cpus_per_worker,
            threads_per_worker=getattr(args, "threads", None),
            n_quantizers=args.n_quantizers, write_dac=getattr(args, "format", "dac") == "dac",
            dtype=args.dtype, tile_frames=args.tile_frames, seed=args.seed, progress=args.progress)
    except ValueError as exc:
        print(f"dac-fast: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    print(report.summary(), file=sys.stderr)
    print(f"codes: {Path(args.output_dir) / SHARDS_DIR}/part-*.parquet; manifest: {MANIFEST}; errors: {ERRORS}",
          file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict()))
    return 0 if report.ok else 1
