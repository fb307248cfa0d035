"""A scheduler thread that owns one model and serves many exact streams through fixed slots.

Each tick the thread takes, for every stream with work queued, its OLDEST request (so a stream pushing fast
cannot starve the others: every waiting stream advances once per tick, round robin by construction), runs all
the pushes of a kind as one ``SlotDecoder.push`` / ``SlotEncoder.push`` (``dac_fast.slots``: exact, batched
by state shape), then the flushes, then at most one batch of whole-file requests (right-padded, the exact
``padding_mask`` / ``audio_frames`` path). Results go back to the asyncio loop that asked.

Two ways a tick gets wider on a loaded server, neither changing any stream's output:

- coalescing: a stream that fell behind (a pipelining client whose pushes queued while a tick ran) has up to
  ``coalesce`` of its queued pushes run as ONE push of their concatenated input; each request still gets
  exactly its own reply (the output is split where each push's samples or frames become final:
  ``SlotDecoder.final_samples`` / ``SlotEncoder.final_frames``). Longer pushes use the CPU better.
- gathering: when a tick is about to start while other streams that pushed in their previous tick have
  nothing queued yet, the thread waits up to ``gather_s`` for them, so streams pushing on the same beat share
  one batched step instead of alternating single-stream ticks.

Bounds: ``decode_slots`` / ``encode_slots`` streams at once, ``waiting`` more waiting for a slot (beyond that
``open_*_stream`` raises ``Busy``), ``max_pending`` queued requests per stream, ``offline_queue`` whole-file
requests. An exception inside a tick fails that tick's requests of the failing call (their streams are closed
and their slots freed); the thread goes on serving the others.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import torch

from ..checks import check_codes, check_stream_samples
from ..modeling import DacModel
from ..tiles import decoded_length
from ..slots import SlotDecoder, SlotEncoder
from .windows import WindowDecoder

# slots: exact, every stream's push of a tick in one batched step; per-stream: exact, one step per stream's push
# (a baseline); windows: Orpheus-style overlapping windows, inexact at the seams (a baseline, see windows.py)
DECODE_MODES = ("slots", "per-stream", "windows")


class Busy(RuntimeError):
    """Every slot and waiting place is taken (a server answers WebSocket 1013 / HTTP 503 with Retry-After)."""


class StreamClosed(RuntimeError):
    """The stream was closed, failed, or the scheduler stopped."""


class _Request:
    __slots__ = ("op", "value", "loop", "future", "queued")

    def __init__(self, op: str, value, loop, future):
        self.op, self.value, self.loop, self.future = op, value, loop, future
        self.queued = time.perf_counter()

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the asking loop is closed: nobody waits for this answer
            pass


class Stream:
    """One client's stream in a slot. ``await push(x)``: its output for that push; ``await finish()``: the rest
    (frees the slot); ``close()``: drop it now (a disconnected client), the slot is freed at the next tick."""

    def __init__(self, lane: "_Lane", slot: int):
        self.lane, self.slot = lane, slot
        self.pending: collections.deque = collections.deque()
        self.closed = False
        self.error: str | None = None
        self.pushes = 0
        self.n_codebooks: int | None = None  # a decode stream's codebook count, fixed by its first push
        self.latencies: collections.deque = collections.deque(maxlen=1024)  # seconds from queued to answered
        self.ticked = -2  # the last tick that advanced this stream (gathering waits for last tick's streams)

    def _submit(self, op: str, value):
        if self.closed:
            raise StreamClosed(self.error or "the stream is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.lane.scheduler._enqueue(self, _Request(op, value, loop, future))
        return future

    def submit(self, value) -> asyncio.Future:
        """Validate and queue one push now (call from the event loop); the future resolves to its output. Lets a
        client's pushes queue behind each other (pipelining) while earlier ones run."""
        if self.closed:
            raise StreamClosed(self.error or "the stream is closed")
        prepared = self.lane.slotted.check_input(self.slot, torch.as_tensor(value))  # (1, n, f) or (1, 1, s)
        if self.lane.kind == "decode":
            # checked here, per stream and in order, not in the batched step: a mismatch there would fail the
            # tick's other streams too (the slot's own count is known only once a push has run)
            if self.n_codebooks is not None and prepared.shape[1] != self.n_codebooks:
                raise ValueError(f"slot {self.slot}: codes have {prepared.shape[1]} codebooks; its earlier pushes "
                                 f"had {self.n_codebooks}")
            self.n_codebooks = prepared.shape[1]
        return self._submit("push", prepared)

    async def push(self, value):
        """Codes (n, f) for a decode stream -> samples (k,); samples (s,) for an encode stream -> codes (n, f)."""
        return await self.submit(value)

    async def finish(self):
        """The rest of the stream's output; closes the stream and frees its slot."""
        return await self._submit("finish", None)

    def close(self) -> None:
        """Drop the stream (nothing more is returned); its slot is freed at the next tick."""
        if not self.closed:
            self.closed = True
            self.lane.scheduler._enqueue(self, None)


class _Lane:
    """The slots of one kind (decode or encode) and the streams in them."""

    def __init__(self, scheduler: "Scheduler", kind: str, slotted):
        self.scheduler, self.kind, self.slotted = scheduler, kind, slotted
        self.streams: dict[int, Stream] = {}
        self.waiting: collections.deque = collections.deque()  # futures of openers waiting for a slot

    def free_slot(self) -> int | None:
        return next((s for s in range(self.slotted.slots) if s not in self.streams), None)

    def release(self, stream: Stream) -> None:
        """Free ``stream``'s slot (scheduler lock held) and hand it to the oldest waiting opener."""
        if self.streams.get(stream.slot) is stream:
            del self.streams[stream.slot]
            self.slotted.reset([stream.slot])
        while self.waiting:
            loop, future = self.waiting.popleft()
            if future.done():
                continue
            slot = self.free_slot()
            opened = self.streams[slot] = Stream(self, slot)
            loop.call_soon_threadsafe(lambda f=future, s=opened: f.set_result(s) if not f.done() else s.close())
            break


class Scheduler:
    """Owns ``model`` on one thread; see the module docstring. Use as a context manager or ``start`` / ``stop``."""

    def __init__(self, model: DacModel, decode_slots: int = 8, encode_slots: int = 4, waiting: int = 8,
                 max_pending: int = 16, offline_batch: int = 8, offline_queue: int = 32,
                 n_quantizers: int | None = None, decode_mode: str = "slots", cuda_graphs: bool = False,
                 coalesce: int = 4, gather_s: float = 0.005):
        for name, value in (("decode_slots", decode_slots), ("encode_slots", encode_slots), ("waiting", waiting),
                            ("max_pending", max_pending), ("offline_batch", offline_batch),
                            ("offline_queue", offline_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if "slots" in name else 0):
                raise ValueError(f"{name} must be a {'positive' if 'slots' in name else 'non-negative'} integer, "
                                 f"got {value!r}")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {decode_mode!r}")
        if isinstance(coalesce, bool) or not isinstance(coalesce, int) or coalesce < 1:
            raise ValueError(f"coalesce must be a positive integer (1: never merge a stream's queued pushes), "
                             f"got {coalesce!r}")
        if isinstance(gather_s, bool) or not isinstance(gather_s, (int, float)) or not 0 <= gather_s <= 1:
            raise ValueError(f"gather_s must be a number of seconds in [0, 1], got {gather_s!r}")
        self.coalesce, self.gather_s = coalesce, float(gather_s)
        self.model = model.eval()
        self.batch_streams = decode_mode != "per-stream"  # per-stream: each push its own model call (a baseline)
        decoder = (WindowDecoder if decode_mode == "windows" else SlotDecoder)(model, decode_slots, cuda_graphs)
        self.lanes = {"decode": _Lane(self, "decode", decoder),
                      "encode": _Lane(self, "encode", SlotEncoder(model, encode_slots, n_quantizers))}
        self.waiting_limit, self.max_pending = waiting, max_pending
        self.offline_batch, self.offline_queue = offline_batch, offline_queue
        self._offline: collections.deque = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.ticks = 0
        self.tick_seconds = 0.0
        self.last_tick_streams = 0
        self.most_tick_streams = 0  # the most streams one tick advanced (batching at work)
        self.failed_ticks = 0
        self.refused = 0
        self.fault = None  # tests: a callable(kind) run inside each batched call, to inject failures

    # ---------------------------------------------------------------- lifecycle
    def start(self, thread: bool = True) -> "Scheduler":
        """Start serving on a thread of its own; ``thread=False``: only mark it running, for ``run_here``.
        A no-op when already running."""
        with self._lock:
            if self._thread is None and not self._running:
                self._running = True
                if thread:
                    self._thread = threading.Thread(target=self._loop, name="dac-fast-scheduler", daemon=True)
                    self._thread.start()
        return self

    def run_here(self) -> None:
        """Serve on the calling thread until ``stop()`` (after ``start(thread=False)``). ``dac-fast serve`` runs the
        model on the main thread that loaded it, the web server on another: OpenMP keeps one worker pool per
        thread that runs torch's parallel work, and with a second pool on the same cores (more workers than
        CPUs) libgomp stops spinning between parallel regions, ~35% slower steps on 2 cores (RESULTS.md)."""
        self._loop()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the requests already queued, then close every stream and stop the thread."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- asyncio API
    async def open_decode_stream(self) -> Stream:
        """A decode stream in a free slot (waits for one while ``waiting`` allows, else raises ``Busy``)."""
        return await self._open("decode")

    async def open_encode_stream(self) -> Stream:
        """An encode stream (samples in, codes out) in a free slot; as ``open_decode_stream``."""
        return await self._open("encode")

    async def _open(self, kind: str) -> Stream:
        lane = self.lanes[kind]
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._running:
                raise StreamClosed("the scheduler is not running")
            slot = lane.free_slot()
            if slot is not None:
                stream = lane.streams[slot] = Stream(lane, slot)
                return stream
            if sum(not f.done() for _, f in lane.waiting) >= self.waiting_limit:
                self.refused += 1
                raise Busy(f"all {lane.slotted.slots} {kind} slots and {self.waiting_limit} waiting places are taken")
            future = loop.create_future()
            lane.waiting.append((loop, future))
        return await future

    async def encode(self, audio: torch.Tensor):
        """Whole-file encode of samples (s,) -> codes (n, f), batched with other clients' requests."""
        audio = torch.as_tensor(audio)
        if audio.dim() != 1:
            raise ValueError(f"audio must be a tensor of shape (samples,), got {tuple(audio.shape)}")
        check_stream_samples(audio)  # NaN here would fail the other clients' requests batched with it
        return await self._offline_request("encode", audio)

    async def decode(self, codes: torch.Tensor):
        """Whole-file decode of codes (n, f) -> samples (k,), batched with other clients' requests."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2:
            raise ValueError(f"codes must have shape (n_codebooks, frames), got {tuple(codes.shape)}")
        codes = check_codes(codes[None], self.model.config)[0]
        return await self._offline_request("decode", codes)

    async def _offline_request(self, op: str, value):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self._running:
                raise StreamClosed("the scheduler is not running")
            if len(self._offline) >= self.offline_queue:
                self.refused += 1
                raise Busy(f"{self.offline_queue} whole-file requests are already queued")
            self._offline.append(_Request(op, value, loop, future))
            self._lock.notify_all()
        return await future

    def _enqueue(self, stream: Stream, request: _Request | None) -> None:
        """Queue a request (None: the stream was dropped) for the scheduler thread."""
        with self._lock:
            if request is not None:
                if stream.closed:  # checked again under the lock: the thread may have just failed the stream
                    raise StreamClosed(stream.error or "the stream is closed")
                if not self._running:
                    raise StreamClosed("the scheduler is stopping")
                if len(stream.pending) >= self.max_pending:
                    raise Busy(f"{self.max_pending} requests of this stream are already queued")
            stream.pending.append(request)
            self._lock.notify_all()

    # ---------------------------------------------------------------- metrics
    def metrics(self) -> dict:
        """A snapshot: per lane the slots in use and waiting openers; per tick counts and time."""
        with self._lock:
            lanes = {kind: {"slots": lane.slotted.slots, "active": len(lane.streams),
                            "waiting": sum(not f.done() for _, f in lane.waiting),
                            "streams": [{"slot": s.slot, "pushes": s.pushes, "queued": len(s.pending),
                                         "latency_p50_s": _quantile(s.latencies, 0.5),
                                         "latency_p99_s": _quantile(s.latencies, 0.99)}
                                        for s in lane.streams.values()]}
                     for kind, lane in self.lanes.items()}
            return {"lanes": lanes, "ticks": self.ticks, "tick_seconds_total": self.tick_seconds,
                    "last_tick_streams": self.last_tick_streams,
                    "most_tick_streams": self.most_tick_streams, "failed_ticks": self.failed_ticks,
                    "refused": self.refused, "offline_queued": len(self._offline)}

    # ---------------------------------------------------------------- the thread
    def _has_work(self) -> bool:
        return bool(self._offline) or any(s.pending for lane in self.lanes.values() for s in lane.streams.values())

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while self._running and not self._has_work():
                    self._lock.wait()
                if not self._running and not self._has_work():
                    break
                self._gather()
                taken = {kind: [(s, self._take(s)) for s in list(lane.streams.values()) if s.pending]
                         for kind, lane in self.lanes.items()}
                offline = [self._offline.popleft() for _ in range(min(self.offline_batch, len(self._offline)))]
            started = time.perf_counter()
            for kind, items in taken.items():
                self._tick_lane(self.lanes[kind], items)
            if offline:
                self._run_offline(offline)
            with self._lock:
                self.ticks += 1
                self.tick_seconds += time.perf_counter() - started
                self.last_tick_streams = sum(len(items) for items in taken.values())
                self.most_tick_streams = max(self.most_tick_streams, self.last_tick_streams)
                for items in taken.values():
                    for stream, _ in items:
                        stream.ticked = self.ticks
        with self._lock:  # stopped: every stream left is closed
            for lane in self.lanes.values():
                for stream in list(lane.streams.values()):
                    self._fail(lane, stream, "the server is shutting down")
                for loop, future in lane.waiting:
                    _Request("open", None, loop, future).resolve(error=StreamClosed("the server is shutting down"))
                lane.waiting.clear()

    def _take(self, stream: Stream):
        """The stream's oldest request (lock held); a push takes up to ``coalesce`` queued pushes behind it as a
        list (one model push of their concatenated inputs)."""
        first = stream.pending.popleft()
        if first is None or first.op != "push":
            return first
        merged = [first]
        while (len(merged) < self.coalesce and stream.pending and stream.pending[0] is not None
               and stream.pending[0].op == "push"):
            merged.append(stream.pending.popleft())
        return merged

    def _gather(self) -> None:
        """Wait (lock held) up to ``gather_s`` for the streams that ran in the previous tick and have nothing
        queued yet, so that streams pushing on one beat run as one batched step."""
        if not self.batch_streams or self.gather_s <= 0 or self._offline:
            return
        deadline = time.perf_counter() + self.gather_s
        while self._running:
            late = [s for lane in self.lanes.values() for s in lane.streams.values()
                    if not s.pending and s.ticked == self.ticks and not s.closed]
            left = deadline - time.perf_counter()
            if not late or left <= 0:
                return
            self._lock.wait(left)

    def _fail(self, lane: _Lane, stream: Stream, message: str) -> None:
        """Close ``stream`` with ``message`` (lock held): its queued requests fail, its slot is freed."""
        stream.closed = True
        stream.error = stream.error or message
        while stream.pending:
            request = stream.pending.popleft()
            if request is not None:
                request.resolve(error=StreamClosed(message))
        lane.release(stream)

    def _tick_lane(self, lane: _Lane, items: list) -> None:
        """``items``: (stream, None (dropped) | a finish request | a list of push requests) of one lane."""
        dropped = [s for s, r in items if r is None]
        pushes = [(s, r) for s, r in items if isinstance(r, list)]
        finishes = [(s, [r]) for s, r in items if r is not None and not isinstance(r, list)]
        with self._lock:
            for stream in dropped:
                self._fail(lane, stream, "the stream was closed")
        calls = [(batch, self._push) for batch in self._batches(pushes)]
        calls += [(batch, self._finish) for batch in self._batches(finishes)]
        for batch, call in calls:
            if not batch:
                continue
            try:
                if self.fault is not None:
                    self.fault(lane.kind)
                answers = call(lane, batch)
            except Exception as exc:  # the tick's streams fail with the message; the others go on
                with self._lock:
                    self.failed_ticks += 1
                    for stream, requests in batch:
                        for request in requests:
                            request.resolve(error=StreamClosed(f"the batched step failed: {exc}"))
                        self._fail(lane, stream, f"the batched step failed: {exc}")
                continue
            now = time.perf_counter()
            with self._lock:
                for stream, requests in batch:
                    for request, answer in zip(requests, answers[stream.slot]):
                        stream.pushes += 1
                        stream.latencies.append(now - request.queued)
                        request.resolve(answer)
                    if requests[0].op == "finish":
                        stream.closed = True
                        lane.release(stream)

    def _batches(self, requests: list) -> list:
        return [requests] if self.batch_streams else [[request] for request in requests]

    @staticmethod
    def _push(lane: _Lane, batch: list) -> dict:
        """One model push per stream of its requests' inputs (validated when queued, by ``Stream.push``)
        concatenated; slot -> each request's share of the output, on the CPU."""
        slotted = lane.slotted
        pushed = {stream.slot: slotted.pushed(stream.slot) for stream, _ in batch}
        outputs = slotted.push_checked({stream.slot: torch.cat([r.value for r in requests], dim=-1)
                                        for stream, requests in batch})
        answers = {}
        for stream, requests in batch:
            output, total = outputs[stream.slot].cpu(), pushed[stream.slot]  # device copies, lock not held
            ends = []
            for request in requests:
                total += request.value.shape[-1]
                ends.append(slotted.final_outputs(total))
            starts = [slotted.final_outputs(pushed[stream.slot])] + ends[:-1]
            if ends[-1] - starts[0] != output.shape[-1]:
                raise RuntimeError(f"slot {stream.slot}: {output.shape[-1]} outputs where {ends[-1] - starts[0]} "
                                   "were due")
            answers[stream.slot] = [output[..., a - starts[0] : b - starts[0]] for a, b in zip(starts, ends)]
        return answers

    @staticmethod
    def _finish(lane: _Lane, batch: list) -> dict:
        outputs = lane.slotted.flush([stream.slot for stream, _ in batch])
        return {stream.slot: [outputs[stream.slot].cpu()] for stream, _ in batch}

    def _run_offline(self, requests: list) -> None:
        """One batch per kind and codebook count: right-padded, each item computed as if alone."""
        groups: dict = {}
        for request in requests:
            key = (request.op, request.value.shape[0] if request.op == "decode" else None)
            groups.setdefault(key, []).append(request)
        for (op, _), batch in groups.items():
            try:
                if self.fault is not None:
                    self.fault(op)
                results = self._encode_batch(batch) if op == "encode" else self._decode_batch(batch)
            except Exception as exc:
                with self._lock:
                    self.failed_ticks += 1
                for request in batch:
                    request.resolve(error=RuntimeError(f"the batched {op} failed: {exc}"))
                continue
            for request, result in zip(batch, results):
                request.resolve(result)

    def _encode_batch(self, batch: list) -> list:
        lengths = torch.tensor([r.value.shape[-1] for r in batch])
        audio = torch.zeros(len(batch), 1, int(lengths.max()), dtype=self.model.dtype)
        for i, request in enumerate(batch):
            audio[i, 0, : lengths[i]] = request.value
        mask = (torch.arange(audio.shape[-1]) < lengths[:, None]).long()
        n_quantizers = self.lanes["encode"].slotted.n_quantizers
        with torch.inference_mode():
            out = self.model.encode(audio.to(self.model.device), n_quantizers=n_quantizers, padding_mask=mask)
        return [out.audio_codes[i, :, : int(out.audio_frames[i])].cpu() for i in range(len(batch))]

    def _decode_batch(self, batch: list) -> list:
        frames = torch.tensor([r.value.shape[-1] for r in batch])
        codes = torch.zeros(len(batch), batch[0].value.shape[0], int(frames.max()), dtype=torch.long)
        for i, request in enumerate(batch):
            codes[i, :, : frames[i]] = request.value
        with torch.inference_mode():
            audio = self.model.decode(audio_codes=codes.to(self.model.device), audio_frames=frames).audio_values
        return [audio[i, : decoded_length(self.model.config, int(frames[i]))].cpu() for i in range(len(batch))]


def _quantile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
