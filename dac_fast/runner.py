"""The machinery of the file pipeline (dac_fast.batch): the run's report, progress, bucketing, and the
runner: a prefetcher (reader pool, window, memory budget) -> the bucketer -> the model step with its
one-by-one fallback -> a write queue (writer pool, bounded waiting results, completion) -> the output
record. ``encode_files`` / ``decode_files`` supply what to load, run and write."""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from . import io as aio
from .dacfile import DacFileError
from .resume import OutputLog

# below this much audio, throughput figures measure start-up, not speed
_MIN_AUDIO_FOR_RATES = 1.0

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
    redone: list = field(default_factory=list)  # Failure-like (input, why its existing output was not trusted)
    failures: list = field(default_factory=list)  # Failure
    stopped: str = ""  # why the run stopped before every input was tried (a full disk), else ""
    audio_seconds: float = 0.0  # audio processed this run (original duration)
    wall_seconds: float = 0.0
    model_seconds: float = 0.0  # time inside model.encode/decode

    @property
    def ok(self) -> bool:
        return not self.failures and not self.stopped

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
        counts = f"{self.task}: {len(self.done)} written, {len(self.skipped)} skipped (already complete), "
        if self.redone:
            counts += f"{len(self.redone)} redone (existing output not trusted), "
        counts += f"{len(self.failures)} failed"
        if self.done and self.audio_seconds >= _MIN_AUDIO_FOR_RATES:
            counts += (f"; {self.audio_seconds / 3600:.4f} audio hours in {self.wall_seconds:.2f} s "
                       f"({self.files_per_second:.2f} files/s, {self.speed:.2f}x real time, "
                       f"RTF {self.realtime_factor:.4f}, model {self.model_seconds:.2f} s)")
        else:
            counts += f"; {self.audio_seconds:.2f} s of audio in {self.wall_seconds:.2f} s"
        lines = [counts]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; inputs not tried are left for the next run")
        if self.redone:
            lines.append(f"redone ({len(self.redone)}):")
            lines += [f"  {f}" for f in self.redone]
        if self.failures:
            lines.append(f"failed inputs ({len(self.failures)}):")
            lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "task": self.task, "written": len(self.done), "skipped": len(self.skipped),
            "redone": [{"path": f.path, "reason": f.reason} for f in self.redone],
            "failed": [{"path": f.path, "reason": f.reason} for f in self.failures], "stopped": self.stopped,
            "audio_seconds": self.audio_seconds, "wall_seconds": self.wall_seconds,
            "model_seconds": self.model_seconds, "files_per_second": self.files_per_second,
            "speed_x_realtime": self.speed, "rtf": self.realtime_factor,
        }


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
            self.bar.set_postfix_str(f"{self.audio_s / 3600:.3f} h audio, {self.audio_s / el:.1f}x real time",
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
    src: Any  # Path
    out: Any  # Path
    rows: Any = None  # np (rows, samples) for encode / codes (rows, n, frames) for decode
    frames: int = 0
    shape_key: Any = None  # exact bucketing also keeps items apart whose rows differ in this (decode: codebooks)
    meta: dict = field(default_factory=dict)


class _Bucketer:
    """Groups loaded items into batches of about ``batch_size`` rows.

    exact: one group per frame count (and ``shape_key``); pad: a single group in arrival order (inputs are
    sorted by length, so neighbours are similar). A group is emitted when it reaches
    ``batch_size`` rows; when more than ``max_pending`` rows wait, the largest group is emitted.
    """

    def __init__(self, batch_size: int, exact: bool, max_pending: int):
        self.batch_size = max(1, int(batch_size))
        self.exact = exact
        self.max_pending = max(self.batch_size, max_pending)
        self.groups: "OrderedDict[Any, list[_Item]]" = OrderedDict()
        self.group_rows: dict[Any, int] = {}
        self.pending = 0

    def add(self, item: _Item) -> list[list[_Item]]:
        key = (item.frames, item.shape_key) if self.exact else 0
        rows = item.rows.shape[0]
        self.groups.setdefault(key, []).append(item)
        self.group_rows[key] = self.group_rows.get(key, 0) + rows
        self.pending += rows
        ready = []
        if self.group_rows[key] >= self.batch_size:
            ready.append(self._pop(key))
        while self.pending > self.max_pending and self.groups:
            ready.append(self.pop_largest())
        return ready

    def _pop(self, key) -> list[_Item]:
        self.pending -= self.group_rows.pop(key)
        return self.groups.pop(key)

    def pop_largest(self) -> list[_Item]:
        if not self.groups:
            return []
        return self._pop(max(self.groups, key=self.group_rows.__getitem__))

    def flush(self) -> list[list[_Item]]:
        return [self._pop(k) for k in list(self.groups)]


def _to_device(x, device):
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# ----------------------------------------------------------------------------------------------
# the runner: prefetcher -> bucketer -> model with fallback -> write queue
# ----------------------------------------------------------------------------------------------
_STALLED = object()


class _Prefetcher:
    """Loads jobs ahead of the model in a reader thread pool, in input order.

    At most ``window`` items and about ``memory_budget`` bytes (``size_fn`` of each job) are
    loaded and not yet ``release``d; one job is always let in when nothing is held, so a single
    huge file still runs. Memory follows the batch size and the budget, not the dataset."""

    def __init__(self, jobs, load_fn, size_fn, workers: int, window: int, memory_budget: int):
        self.jobs = iter(enumerate(jobs))
        self.load_fn, self.size_fn = load_fn, size_fn
        self.window, self.memory_budget = window, memory_budget
        self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dacfast-read")
        self.inflight: "OrderedDict[int, tuple[Any, cf.Future]]" = OrderedDict()
        self.peeked = None  # the next (index, job), read from ``jobs`` but not yet let in
        self.held = 0
        self.cost: dict[int, int] = {}

    def _top_up(self):
        while len(self.inflight) < self.window:
            if self.peeked is None:
                try:
                    self.peeked = next(self.jobs)
                except StopIteration:
                    return
            i, job = self.peeked
            need = int(self.size_fn(job)) if self.size_fn else 0
            if self.held and self.held + need > self.memory_budget:
                return
            self.peeked = None
            self.cost[i] = need
            self.held += need
            self.inflight[i] = (job, self.pool.submit(self.load_fn, i, job))

    def next(self):
        """``(job, item, error)`` of the next job in order; ``_STALLED`` when the budget is held by
        items not yet released (run some, or ``unblock``); None when every job was handed out."""
        self._top_up()
        if not self.inflight:
            return _STALLED if self.peeked is not None else None
        i, (job, fut) = self.inflight.popitem(last=False)
        try:
            return job, fut.result(), None
        except Exception as exc:
            self.release_index(i)
            return job, None, exc

    def release_index(self, i: int):
        self.held -= self.cost.pop(i, 0)

    def release(self, items: list[_Item]):
        for it in items:
            self.release_index(it.idx)

    def unblock(self):
        """Nothing is pending anywhere: let the next (huge) job in."""
        self.held = 0

    def shutdown(self, wait: bool):
        self.pool.shutdown(wait=wait, cancel_futures=not wait)


class _WriteQueue:
    """Writes results in a writer thread pool. At most ``slots`` results wait to be written (a fast
    GPU must not pile decoded audio up in RAM); ``on_done(item, holds, exc)`` runs as each write
    completes (``holds``: what ``write_fn`` says the output holds)."""

    def __init__(self, write_fn, workers: int, slots: int, on_done):
        self.write_fn, self.on_done = write_fn, on_done
        self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dacfast-write")
        self.slots = threading.Semaphore(slots)

    def submit(self, item: _Item, result):
        self.slots.acquire()
        fut = self.pool.submit(self.write_fn, item, result)
        fut.add_done_callback(lambda f: self._done(f, item))

    def _done(self, fut, item):
        self.slots.release()
        if fut.cancelled():
            self.on_done(item, None, cf.CancelledError())
        else:
            exc = fut.exception()
            self.on_done(item, None if exc else fut.result(), exc)

    def shutdown(self, cancel: bool = False):
        self.pool.shutdown(wait=True, cancel_futures=cancel)


def run_with_fallback(step: Callable[[list], list], items: list, on_failure: Callable[[Any, Exception], None]) -> list:
    """``step(items)`` -> one result per item; when the batch raises, the items are retried one by
    one so that one bad item fails alone (``on_failure(item, exc)``). Returns ``[(item, result)]``
    of the items that succeeded."""
    try:
        return list(zip(items, step(items)))
    except Exception as exc:
        if len(items) == 1:
            on_failure(items[0], exc)
            return []
    done = []
    for it in items:
        done += run_with_fallback(step, [it], on_failure)
    return done


def _load_failure(job, exc) -> Failure:
    if isinstance(exc, aio.AudioError):
        return Failure(exc.path, exc.reason)
    if isinstance(exc, DacFileError):
        return Failure(str(job[0]), str(exc).split(": ", 1)[-1])
    return Failure(str(job[0]), f"{type(exc).__name__}: {exc}")


class _Outcomes:
    """Where each item of a run ends up, in the report and the output record: written (claimed before its
    file appears, recorded after), failed (load, model or write), or left for the next run once a full disk
    stopped the run. Called from the main loop and the writer threads."""

    def __init__(self, report: Report, log: OutputLog, write_fn, progress: _Progress):
        self.report, self.log, self.write_fn, self.progress = report, log, write_fn, progress
        self.lock = threading.Lock()

    def write(self, item: _Item, result):
        self.log.claim(item.out)  # before the file appears: a run killed before its record still knows it as ours
        return self.write_fn(item, result)

    def written(self, item: _Item, holds, exc):
        duration = item.meta.get("duration", 0.0)
        if exc is None:
            try:
                self.log.add(item.src, item.out, holds)
            except OSError as e:  # the output is fine; only its record is missing (its claim vouches for it)
                exc = e
        report = self.report
        with self.lock:
            if exc is None:
                report.done.append((str(item.src), str(item.out)))
                report.audio_seconds += duration
            elif report.stopped and isinstance(exc, cf.CancelledError):
                pass  # never started: left for the next run, like the inputs never read
            else:
                report.failures.append(Failure(str(item.src), _write_failure(item, exc)))
                if isinstance(exc, OSError) and exc.errno in aio.DISK_FULL and not report.stopped:
                    report.stopped = f"{aio.os_reason(exc)} writing {item.out}"  # every later write would fail too
            self.progress.update(1, duration if exc is None else 0.0)

    def failed(self, failure: Failure):
        with self.lock:
            self.report.failures.append(failure)
            self.progress.update(1, 0.0)

    def model_failed(self, item: _Item, exc: Exception):
        self.failed(Failure(str(item.src), f"model failed: {type(exc).__name__}: {exc}"))


def _run(task, jobs, report, load_fn, model_fn, write_fn, *, batch_size, workers, exact, progress,
         log: OutputLog, size_fn=None, memory_budget=2 << 30):
    """Prefetch -> bucket -> model (with fallback) -> write queue -> record, in input order."""
    prog = _Progress(len(jobs), task, progress)
    workers = max(1, int(workers))
    outcomes = _Outcomes(report, log, write_fn, prog)
    prefetch = _Prefetcher(jobs, load_fn, size_fn, workers, window=max(2 * workers, 2 * batch_size),
                           memory_budget=memory_budget)
    writes = _WriteQueue(outcomes.write, max(1, min(4, workers)), max(4, 2 * batch_size), outcomes.written)
    bucketer = _Bucketer(batch_size, exact, max_pending=4 * max(1, batch_size))

    def run_batch(batch: list[_Item]):
        t = time.perf_counter()
        results = run_with_fallback(model_fn, batch, outcomes.model_failed)
        report.model_seconds += time.perf_counter() - t
        for it, res in results:
            it.rows = None  # free input memory early
            writes.submit(it, res)
        prefetch.release(batch)

    try:
        while not report.stopped:
            got = prefetch.next()
            if got is None:
                break
            if got is _STALLED:  # the budget is held by items waiting in the bucketer
                batch = bucketer.pop_largest()
                if batch:
                    run_batch(batch)
                else:
                    prefetch.unblock()
                continue
            job, item, exc = got
            if exc is not None:
                outcomes.failed(_load_failure(job, exc))
                continue
            for batch in bucketer.add(item):
                run_batch(batch)
        for batch in [] if report.stopped else bucketer.flush():
            run_batch(batch)
    except BaseException:
        # Ctrl-C / SIGTERM / fatal error: stop reading, let in-flight writes finish atomically
        prefetch.shutdown(wait=False)
        writes.shutdown(cancel=True)
        prog.close()
        raise
    prefetch.shutdown(wait=not report.stopped)
    writes.shutdown(cancel=bool(report.stopped))
    prog.close()


def _write_failure(item: _Item, exc: BaseException) -> str:
    if isinstance(exc, OSError):  # the temporary is gone (atomic_path): no partial output is left
        return f"write failed: {aio.os_reason(exc)} ({item.out}); no partial output left"
    return f"write failed: {type(exc).__name__}: {exc}"
