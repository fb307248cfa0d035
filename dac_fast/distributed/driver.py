"""The driver of a distributed encode: :func:`encode_dataset` builds the Ray Data pipeline of
dac_fast.distributed.stages, collects the status rows under a stall watchdog, and writes the
manifest and errors tables however the run ends (completed, stalled, stopped by Ray, interrupted).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from .. import io as aio
from ..arguments import check_n_quantizers
from ..job_model import load_model, model_config, model_rate_and_hop, n_codebooks_of
from ..planning import AUDIO_EXTENSIONS, encoded_output, expand_inputs, output_collisions, refuse_outputs_onto_inputs
from ..runner import Failure, Report
from . import DEFAULT_STALL_TIMEOUT
from .cluster import worker_runtime_env
from .schema import DAC_DIR, RUN_INFO, SHARDS_DIR, completed, read_errors, shard_files, write_summary
from .stages import AttemptLedger, Encoder, Reader, Writer

LOST = "lost: Ray gave up on its block after retries (worker crash?); re-run to retry"


class EncodeStopped(RuntimeError):
    """The job stopped before every input was processed (Ray gave up, or nothing completed for the
    stall timeout with a user Dataset as input). manifest.parquet and errors.parquet are written."""


class _Stalled(Exception):
    pass


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
    max_task_retries: int = 3,
    max_errored_blocks: int = -1,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    progress: bool | None = None,
) -> Report:
    """Encode a corpus on a Ray cluster (or a local Ray); returns a dac_fast.batch ``Report``.

    ``inputs``: files, directories (recursive) and glob patterns on a filesystem every node
    sees, or a ``ray.data.Dataset`` with a ``path`` column (the input's id, used for resume)
    and an audio column: ``audio``/``bytes`` holding encoded file bytes (e.g.
    ``ray.data.read_binary_files(..., include_paths=True)``) or ``audio``/``amplitude`` holding
    samples (channels, samples) with a ``sample_rate`` column.
    ``output``: a directory every node sees (layout in dac_fast.distributed's docstring).
    ``model``: a spec for :func:`dac_fast.job_model.load_model` (directory, .pth, hub id, preset)
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
    spreads reading wider; a read crash past the retries loses one block, listed as lost).
    ``address``: for ``ray.init`` when Ray is not initialized yet (None: Ray's default lookup,
    else a new local Ray; "auto"; "local"; "ray://host:10001").
    ``runtime_env``: for a Ray started here (default: whatever lets workers import dac_fast, see
    :func:`worker_runtime_env`).
    Faults: ``max_retries``: retries of a read/write task whose worker died. Encoder actors are
    restarted without limit; a batch whose encoder died while running it is retried
    ``max_task_retries`` times, then its inputs are listed as lost (batches queued behind it are
    retried, not lost); the same number of consecutive deaths of actors while starting (loading
    the model) stops the job. ``max_errored_blocks``: read/write blocks Ray may give up on (-1:
    any) -- their inputs are listed as lost and retried by the next run. ``stall_timeout``:
    seconds without a completed block after which the job is stopped and what remains is
    listed as lost. Whatever ends the run, manifest.parquet and errors.parquet are written;
    :class:`EncodeStopped` is raised when the job could not run to its end for a reason other
    than lost inputs (its message says why), ``KeyboardInterrupt`` passes through.
    """
    ray = aio.require("ray", "the Ray engine (--ray)")
    aio.require("ray.data", "the Ray engine (--ray)")

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not stall_timeout or stall_timeout <= 0:
        raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}")
    if max_task_retries < 0:
        raise ValueError(f"max_task_retries must be >= 0, got {max_task_retries!r}")
    report = Report(task="encode (ray)")
    output = Path(output).resolve()
    sr, hop, spec = _prepare_output(output, model, seed, dtype, n_quantizers, normalize_db)
    prev_errors = {r["path"]: r["reason"] for r in read_errors(output)}

    started = False
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=worker_runtime_env(runtime_env, local=address in (None, "local")),
                 include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        started = True
    ledger = None
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

        ds, attempted = _input_dataset(ray, inputs, output, write_dac, files_per_block, report)
        seen: set[str] = set()

        def finish(unseen_reason):
            report.wall_seconds = time.perf_counter() - t0
            _finish(output, report, prev_errors, attempted, seen, unseen_reason)

        if ds is None:  # nothing left to do
            finish(None)
            return report
        ledger = _start_ledger(ray)
        ds = _call(ds.map, Reader(sr, hop, normalize_db, audio_column), dict(num_cpus=read_num_cpus),
                   dict(max_retries=max_retries))
        ds = _encode_stage(ray, ds, spec, batch_size, concurrency, gpus, cpus, device, dtype, seed, n_quantizers,
                           tile_frames, threads_per_worker, ledger, max_task_retries)
        ds = _call(ds.map_batches, Writer(str(output), write_dac),
                   dict(batch_size=files_per_shard or batch_size, batch_format="numpy", num_cpus=0.25),
                   dict(max_retries=max_retries))
        _watch(ray, ds, ledger, stall_timeout, lambda rows: _record(rows, report, seen), finish,
               user_dataset=attempted is None)
        return report
    finally:
        if ledger is not None:
            ray.kill(ledger)
        if started:
            ray.shutdown()


def _start_ledger(ray):
    """The run's stages.AttemptLedger, preferably on the driver's node (which the job cannot outlive)."""
    ledger = ray.remote(num_cpus=0)(AttemptLedger)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        ledger = ledger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True))
    except Exception:  # e.g. Ray Client, where the driver is not a node: Ray's default placement
        pass
    return ledger.remote()


def _watch(ray, ds, ledger, stall_timeout: float, on_rows, finish, user_dataset: bool) -> None:
    """Run the pipeline to its end under the stall watchdog, then ``finish(reason for the inputs
    that never came back)`` -- also when it stalls, fails or is interrupted, after stopping it.
    Raises EncodeStopped when Ray gave up, or on a stall with a user Dataset (its remaining inputs
    are unknown); KeyboardInterrupt passes through."""
    try:
        _collect(ds, stall_timeout, on_rows)
    except _Stalled:
        _stop(ray, ds, ledger)
        stalled = f"no block completed for {stall_timeout:g} s (stall timeout); the job was stopped"
        finish(f"lost: {stalled}; re-run to retry")
        if user_dataset:
            raise EncodeStopped(f"{stalled}; manifest.parquet and errors.parquet are written; "
                                "re-run to continue") from None
        return
    except KeyboardInterrupt:
        _stop(ray, ds, ledger)
        finish("interrupted before it completed; re-run to continue")
        raise
    except Exception as exc:  # Ray gave up (e.g. encoder actors keep dying while loading the model)
        _stop(ray, ds, ledger)
        why = _describe(exc)
        finish(f"lost: the job stopped: {why}")
        raise EncodeStopped(f"the Ray job stopped: {why}. manifest.parquet and errors.parquet are written; "
                            "re-run to continue") from exc
    finish(LOST)


def _prepare_output(output: Path, model, seed, dtype, n_quantizers, normalize_db):
    """Create the output layout and run.json; refuse resuming with another model setup.
    Returns (model_rate, hop, picklable model spec)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / SHARDS_DIR).mkdir(exist_ok=True)
    sr, hop, n_cb, spec, holder = _model_info(model, seed, dtype)
    check_n_quantizers(n_quantizers, n_cb)
    info = {"model_sample_rate": sr, "hop_length": hop, "n_codebooks": n_cb, "n_quantizers": n_quantizers,
            "normalize_db": normalize_db, "model": spec if isinstance(spec, str) else type(spec).__name__}
    info_path = output / RUN_INFO
    if info_path.exists():
        try:
            prev = json.loads(info_path.read_text())
        except ValueError:
            prev = None
        if not isinstance(prev, dict) or "model_sample_rate" not in prev:
            raise ValueError(f"{info_path} exists and dac-fast did not write it; not replaced: use another "
                             "output directory")
        diff = {k: (prev.get(k), info[k]) for k in ("model_sample_rate", "hop_length", "n_codebooks", "n_quantizers",
                                                    "normalize_db") if prev.get(k) != info[k]}
        if diff and shard_files(output):
            raise ValueError(f"{output} holds codes from a different setup {diff}; use another output directory")
    aio.atomic_write_text(info_path, json.dumps(info, indent=1))
    aio.cleanup_temp_files(output)
    return sr, hop, spec


def _model_info(model, seed, dtype):
    """(model_rate, hop, n_codebooks, picklable spec, object with .config) for the driver.

    Presets and model directories only need their config (no weights are built on the driver);
    other specs (.pth, hub ids) are loaded once on CPU to read it."""
    from types import SimpleNamespace

    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        config = model_config(spec)
        holder = (SimpleNamespace(config=config) if config is not None
                  else load_model(spec, "cpu", dtype, seed=seed, quiet=True))
    else:
        spec = holder = model
    sr, hop = model_rate_and_hop(holder)
    return sr, hop, n_codebooks_of(holder.config), spec, holder


def _input_dataset(ray, inputs, output: Path, write_dac: bool, files_per_block: int, report: Report):
    """(dataset of input rows or None when nothing is left, the input paths or None for a user Dataset).
    Completed inputs (in a shard) are skipped; unusable ones become report failures."""
    done = completed(output)
    if isinstance(inputs, ray.data.Dataset):
        if "path" not in (inputs.schema().names if inputs.schema() else []):
            raise ValueError("an input Dataset needs a 'path' column (the id used for resume and errors)")
        done_paths = set(done)
        ds = inputs.filter(lambda r: str(r["path"]) not in done_paths) if done_paths else inputs
        return (ds.map(_add_rel) if write_dac else ds), None
    expanded, failures = expand_inputs(inputs, AUDIO_EXTENSIONS)
    report.failures += failures
    if write_dac:  # inputs sharing a .dac path fail (the .dac files mirror the input tree)
        pairs = [(src, encoded_output(output / DAC_DIR, rel, "dac")) for src, rel in expanded]
        refuse_outputs_onto_inputs(pairs)
        kept, collisions = output_collisions(pairs)
        report.failures += collisions
        kept_sources = {src for src, _ in kept}
        expanded = [(src, rel) for src, rel in expanded if src in kept_sources]
    items = []
    for src, rel in expanded:
        key = os.path.abspath(src)
        if key in done:
            report.skipped.append((key, done[key]["shard"]))
            continue
        items.append({"path": key, "rel": str(rel)})
    attempted = [it["path"] for it in items]
    if not items:
        return None, attempted
    total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_blocks = max(1, min(len(items), max(math.ceil(len(items) / max(1, files_per_block)), 2 * total_cpus)))
    return ray.data.from_items(items, override_num_blocks=n_blocks), attempted


def _encode_stage(ray, ds, spec, batch_size, concurrency, gpus, cpus, device, dtype, seed, n_quantizers,
                  tile_frames, threads_per_worker, ledger, max_task_retries):
    """The encoder actor pool. Actors restart without limit and Ray re-submits their tasks without
    limit (a lifetime restart budget leaves dead actors in Ray Data's pool and the job waits
    forever); the cap per batch is the ledger's (stages.AttemptLedger)."""
    if isinstance(concurrency, (tuple, list)):
        pool = ray.data.ActorPoolStrategy(min_size=int(concurrency[0]), max_size=int(concurrency[-1]))
    else:
        pool = ray.data.ActorPoolStrategy(size=int(concurrency))
    kwargs = dict(model=spec, device=device or ("cuda" if gpus > 0 else "cpu"), dtype=dtype, seed=seed,
                  n_quantizers=n_quantizers, tile_frames=tile_frames,
                  threads=threads_per_worker or max(1, int(round(cpus))),
                  ledger=ledger, max_task_retries=max_task_retries)
    return _call(ds.map_batches, Encoder,
                 dict(fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy", compute=pool,
                      num_gpus=gpus if gpus > 0 else None, num_cpus=cpus),
                 dict(max_restarts=-1, max_task_retries=-1))


def _call(method, fn, kwargs: dict, remote_args: dict):
    """``method(fn, **kwargs, **remote_args)`` for ds.map / ds.map_batches. Ray >= 2.60 deprecates
    passing ``ray.remote`` options (max_retries, max_restarts) as keyword arguments and has no
    named replacement yet: keep them (silencing the warning); where they are refused, Ray Data's
    defaults apply (infinite actor restarts and task retries, 3 retries per read/write task)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        try:
            return method(fn, **kwargs, **remote_args)
        except TypeError:
            return method(fn, **kwargs)


def _collect(ds, stall_timeout: float, on_rows) -> None:
    """Iterate the pipeline's status rows in a helper thread and hand each block's rows to
    ``on_rows``. Raises _Stalled when no block arrives for ``stall_timeout`` seconds, the
    pipeline's exception when it fails, KeyboardInterrupt on Ctrl-C (the wait is interruptible)."""
    q: queue.Queue = queue.Queue()

    def consume():
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="numpy"):  # one block at a time
                q.put(("rows", block))
            q.put(("end", None))
        except BaseException as exc:  # handed to the driver thread
            q.put(("error", exc))

    threading.Thread(target=consume, name="dac-fast-ray-status", daemon=True).start()
    poll = min(5.0, max(0.1, stall_timeout / 10))
    last = time.monotonic()
    while True:
        try:
            kind, value = q.get(timeout=poll)
        except queue.Empty:
            if time.monotonic() - last > stall_timeout:
                raise _Stalled() from None
            continue
        if kind == "end":
            return
        if kind == "error":
            raise value
        on_rows(value)
        last = time.monotonic()


def _record(block: dict, report: Report, seen: set) -> None:
    for i in range(len(block["path"])):
        path = str(block["path"][i])
        seen.add(path)
        if block["error"][i]:
            report.failures.append(Failure(path, str(block["error"][i])))
        else:
            report.done.append((path, str(block["shard"][i])))
            report.audio_seconds += float(block["duration"][i])
            report.model_seconds += float(block["encode_seconds"][i])


def _stop(ray, ds, ledger) -> None:
    """Stop a pipeline the driver gives up on, so a Ray session the caller owns gets its CPUs/GPUs
    back: shut Ray Data's executor down (found through internals: best effort) and kill the
    encoder actors (an actor stuck in native code ignores everything else)."""
    executors = [getattr(ds, "_current_executor", None)]  # set once the first block has arrived
    try:  # before that, only its thread (named after the dataset run) knows it
        name = f"StreamingExecutor-{ds.get_dataset_id()}"
        executors += [t for t in threading.enumerate() if t.name == name]
    except Exception:
        pass
    for executor in executors:
        try:
            if executor is not None:
                executor.shutdown(force=True)
        except Exception:
            pass
    try:
        for handle in ray.get(ledger.actor_handles.remote(), timeout=30):
            ray.kill(handle, no_restart=True)
    except Exception:
        pass


def _describe(exc: BaseException) -> str:
    """One line for a Ray error (Ray's messages carry tracebacks and worker log hints)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "creation task" in str(exc) and lines:  # the constructor raised: its exception is the last line
        return f"encoder actors could not start: {lines[-1]}"[:500]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def _finish(output: Path, report: Report, prev_errors: dict, attempted, seen: set, unseen_reason) -> None:
    """Write manifest.parquet (every input in a shard) and errors.parquet (this run's failures, the
    attempted inputs that never came back with ``unseen_reason``, and earlier failures not retried)."""
    done = completed(output)  # shards are the truth, also for blocks whose status never arrived
    errors = {f.path: f.reason for f in report.failures}
    for path in attempted or []:
        if path not in seen and path not in done and path not in errors and unseen_reason:
            report.failures.append(Failure(path, unseen_reason))
            errors[path] = unseen_reason
    attempted = set(attempted or [])
    for path, reason in prev_errors.items():  # earlier failures not retried this run stay listed
        if path not in errors and path not in done and path not in attempted:
            errors[path] = reason
    write_summary(output, done, errors)


def _check_resources(res: dict, concurrency, cpus: float, gpus: float, read_cpus: float):
    """Refuse configurations that cannot make progress: actors holding every CPU starve the read
    tasks and the job would wait forever. Judged on the cluster as it is now (an autoscaler may
    add nodes later: then start the job with fewer actors, or an autoscaling ``concurrency=(min, max)``)."""
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


def _add_rel(row: dict) -> dict:
    p = Path(str(row["path"]))
    row["rel"] = str(Path(*[x for x in p.parts if x not in (p.anchor, "..")]))
    return row
