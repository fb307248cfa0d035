"""The ASGI server (Starlette on uvicorn) in front of a ``Scheduler``: streaming over WebSockets, whole files
over HTTP, ``/healthz`` and Prometheus ``/metrics``. ``dac-fast serve`` runs it; README "Serving" documents
the protocol.

WebSocket ``/v1/decode`` (codes in, PCM out) and ``/v1/encode`` (PCM in, codes out):

1. the client sends a JSON text message ``{"type": "start", ...}`` (decode: ``"dtype"`` of its codes, one of
   uint16/int16/int32/int64, and ``"codebooks"``; encode: ``"dtype"`` float32 or int16, ``"sample_rate"``
   equal to the model's, ``"channels": 1``);
2. the server answers ``{"type": "ready", ...}`` (rates, the dtype it sends, codebooks, limits);
3. each binary message is one push: little-endian, decode: ``frames x codebooks`` codes frame-major; encode:
   mono samples. Each push gets exactly one binary reply, in order (decode: float32 samples, possibly none;
   encode: uint16 codes, frames x codebooks frame-major, possibly none). A client may pipeline: send pushes
   as its frames come without waiting for replies; the server reads ahead up to the scheduler's
   ``max_pending`` pushes per stream (then stops reading: TCP backpressure), and a stream that fell behind
   has its queued pushes run as one (see ``scheduler``), each still answered on its own;
4. ``{"type": "end"}`` gets the last binary reply and ``{"type": "done", ...}``, then close 1000.

Close codes: 1007 malformed or out-of-range data (the reason says what), 1008 a missing or wrong token, or a
client that stopped reading, 1009 a message or stream over the limits, 1013 no free slot (try again later),
1011 the batched step failed, 1001 the server is shutting down. Nothing on the wire is pickled: JSON and raw
little-endian arrays (the HTTP ``.dac`` upload is read by ``dacfile``'s restricted reader, which runs no code).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..feature_extraction import pcm_to_float
from .scheduler import Busy, Scheduler, StreamClosed

CODE_DTYPES = {"uint16": "<u2", "int16": "<i2", "int32": "<i4", "int64": "<i8"}
PCM_DTYPES = {"float32": "<f4", "int16": "<i2"}
DRAIN_GRACE_S = 0.5  # on shutdown, how long a stream's next message may take to arrive before it is closed


class ProtocolError(Exception):
    """A client's mistake: closes its stream with ``code`` and ``message``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _reason(message: str) -> str:
    """A WebSocket close reason is at most 123 bytes."""
    data = message.encode()[:123]
    return data.decode(errors="ignore")


class _Session:
    """One WebSocket stream: parses the framing, pushes through the scheduler, sends replies through a bounded
    outbox drained by its own task (a client that stops reading fills it and is dropped, others unaffected)."""

    def __init__(self, app_state, websocket, kind: str):
        self.state, self.ws, self.kind = app_state, websocket, kind
        self.outbox: asyncio.Queue = asyncio.Queue(app_state.outbox)
        self.stop = asyncio.Event()  # set when the server drains
        self.pushed = 0  # frames or samples
        self.stream = None  # the scheduler's stream, once a slot is ours
        # pushes read ahead, answered in order by reply_loop; at most the scheduler's max_pending unanswered, so
        # it never refuses one (beyond that the server stops reading: TCP backpressure)
        self.inflight: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Semaphore(app_state.scheduler.max_pending)
        self.failure: asyncio.Future = asyncio.get_running_loop().create_future()  # set by reply_loop

    def parse_start(self, text: str) -> dict:
        try:
            start = json.loads(text)
        except json.JSONDecodeError:
            raise ProtocolError(1007, "the first message must be JSON: {\"type\": \"start\", ...}") from None
        if not isinstance(start, dict) or start.get("type") != "start":
            raise ProtocolError(1007, "the first message must be {\"type\": \"start\", ...}")
        config = self.state.model.config
        table = CODE_DTYPES if self.kind == "decode" else PCM_DTYPES
        dtype = start.get("dtype", "uint16" if self.kind == "decode" else "float32")
        if dtype not in table:
            raise ProtocolError(1007, f"dtype must be one of {', '.join(table)}, got {dtype!r}")
        self.dtype = np.dtype(table[dtype])
        if self.kind == "decode":
            n = start.get("codebooks", config.n_codebooks)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= config.n_codebooks:
                raise ProtocolError(1007, f"codebooks must be an integer in [1, {config.n_codebooks}], got {n!r}")
            self.codebooks = n
            return {"type": "ready", "sample_rate": config.sampling_rate, "hop_length": config.hop_length,
                    "channels": 1, "dtype": "float32", "codebooks": n, "max_message_bytes": self.state.max_message,
                    "max_frames": self.state.max_frames}
        if start.get("sample_rate", config.sampling_rate) != config.sampling_rate:
            raise ProtocolError(1007, f"sample_rate must be the model's {config.sampling_rate}, got "
                                      f"{start.get('sample_rate')!r} (resample before streaming)")
        if start.get("channels", 1) != 1:
            raise ProtocolError(1007, f"channels must be 1 (one stream per channel), got {start.get('channels')!r}")
        return {"type": "ready", "sample_rate": config.sampling_rate, "hop_length": config.hop_length,
                "channels": 1, "dtype": "uint16", "codebooks": self.state.scheduler.lanes["encode"].slotted.n_quantizers,
                "max_message_bytes": self.state.max_message, "max_frames": self.state.max_frames}

    def parse_push(self, data: bytes) -> torch.Tensor:
        if len(data) % self.dtype.itemsize or not data:
            raise ProtocolError(1007, f"a binary message must hold whole {self.dtype.name} values, got {len(data)} bytes")
        values = np.frombuffer(data, dtype=self.dtype)
        if self.kind == "decode":
            if values.size % self.codebooks:
                raise ProtocolError(1007, f"a decode message must hold frames x {self.codebooks} codes, got "
                                          f"{values.size} values")
            codes = values.reshape(-1, self.codebooks).T.astype(np.int64)
            self.pushed += codes.shape[1]
            tensor = torch.from_numpy(codes)
        else:
            audio = np.array(pcm_to_float(values, "audio"), dtype=np.float32)  # a writable copy
            self.pushed += audio.size
            tensor = torch.from_numpy(audio)
        hop = self.state.model.config.hop_length
        if self.pushed > self.state.max_frames * (hop if self.kind == "encode" else 1):
            raise ProtocolError(1009, f"the stream passed its limit of {self.state.max_frames} frames")
        return tensor

    def encode_reply(self, output: torch.Tensor) -> bytes:
        if self.kind == "decode":
            return output.to(torch.float32).numpy().astype("<f4").tobytes()
        return output.T.contiguous().numpy().astype("<u2").tobytes()

    async def converse(self) -> tuple[int, str]:
        """The whole exchange after accept -> (close code, reason); ProtocolError for the client's mistakes."""
        message = await self.receive()
        if message is None or message["type"] == "websocket.disconnect":
            return 1000, "done"
        if message.get("text") is None:
            raise ProtocolError(1007, "the first message must be a JSON text message {\"type\": \"start\", ...}")
        ready = self.parse_start(message["text"])
        scheduler = self.state.scheduler
        try:
            self.stream = await (scheduler.open_decode_stream() if self.kind == "decode"
                                 else scheduler.open_encode_stream())
        except Busy as exc:
            raise ProtocolError(1013, f"busy: {exc}; retry later") from None
        self.reply({**ready, "slot": self.stream.slot})
        replier = asyncio.ensure_future(self.reply_loop())
        try:
            return await self.stream_loop(replier)
        finally:
            replier.cancel()

    async def stream_loop(self, replier: asyncio.Task) -> tuple[int, str]:
        while True:
            message = await self.receive()
            if message is None:
                await self.replies_sent(replier)  # pushes already read are still answered
                return 1001, "the server is shutting down"
            if message["type"] == "websocket.disconnect":
                return 1000, "done"
            if message.get("bytes") is None:
                break
            if len(message["bytes"]) > self.state.max_message:
                raise ProtocolError(1009, f"a message may hold at most {self.state.max_message} bytes")
            value = self.parse_push(message["bytes"])
            await self.or_failure(self.room.acquire())
            try:
                future = self.stream.submit(value)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(1007, str(exc)) from None
            self.inflight.put_nowait(future)
        try:
            end = json.loads(message.get("text") or "")
        except json.JSONDecodeError:
            end = None
        if not isinstance(end, dict) or end.get("type") != "end":
            raise ProtocolError(1007, "text messages after start must be {\"type\": \"end\"}")
        await self.replies_sent(replier)
        self.reply(self.encode_reply(await self.stream.finish()))
        self.reply({"type": "done", "pushed": self.pushed})
        return 1000, "done"

    async def reply_loop(self) -> None:
        """Answer the pushes read ahead, in order; the first failure ends the stream (through ``failure``)."""
        try:
            while (future := await self.inflight.get()) is not None:
                await self.reply_soon(self.encode_reply(await future))
                self.room.release()
        except Exception as exc:
            self.failure.set_exception(exc)

    async def replies_sent(self, replier: asyncio.Task) -> None:
        """Wait until every push read so far is answered (or raise the failure that ended the answers)."""
        await self.or_failure(self.inflight.put(None))
        await self.or_failure(asyncio.shield(replier))

    async def or_failure(self, awaitable):
        """``await awaitable``, unless the replies failed first: then raise that failure."""
        task = asyncio.ensure_future(awaitable)
        await asyncio.wait({task, self.failure}, return_when=asyncio.FIRST_COMPLETED)
        if self.failure.done():
            task.cancel()
            self.failure.result()
        return task.result()

    async def send_loop(self) -> None:
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            if isinstance(item, bytes):
                await asyncio.wait_for(self.ws.send_bytes(item), self.state.send_timeout)
            else:
                await asyncio.wait_for(self.ws.send_text(json.dumps(item)), self.state.send_timeout)

    def reply(self, item) -> None:
        try:
            self.outbox.put_nowait(item)
        except asyncio.QueueFull:
            raise self.stopped_reading() from None

    def stopped_reading(self) -> ProtocolError:
        return ProtocolError(1008, f"the client stopped reading: {self.state.outbox} replies are waiting")

    async def reply_soon(self, item) -> None:
        """``reply``, waiting up to ``send_timeout`` for room: pipelined pushes coalesced in one tick are answered
        at once, more replies than the outbox holds, from a client that does read."""
        try:
            await asyncio.wait_for(self.outbox.put(item), self.state.send_timeout)
        except asyncio.TimeoutError:
            raise self.stopped_reading() from None

    async def receive(self):
        """The next message, or None once the server drains: a push already sent when the drain began (read
        within ``DRAIN_GRACE_S``) is still served, never cut off midway."""
        receive = asyncio.ensure_future(self.ws.receive())
        stop = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({receive, stop, self.failure}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if self.failure.done():  # a push failed while we waited for the client's next message
            receive.cancel()
            self.failure.result()
        if not receive.done():
            await asyncio.wait({receive}, timeout=DRAIN_GRACE_S)
        if receive.done():
            return receive.result()
        receive.cancel()
        return None


def _check_token(state, headers) -> bool:
    if state.token is None:
        return True
    return headers.get("authorization", "") == f"Bearer {state.token}"


async def _websocket_stream(websocket, kind: str) -> None:
    state = websocket.app.state.dac
    await websocket.accept()  # refusals below are close codes with a reason, not a bare HTTP 403
    if not _check_token(state, websocket.headers):
        await websocket.close(code=1008, reason="a bearer token is required (Authorization: Bearer ...)")
        return
    if state.draining:
        await websocket.close(code=1001, reason="the server is shutting down")
        return
    session = _Session(state, websocket, kind)
    sender = asyncio.ensure_future(session.send_loop())
    state.sessions.add(session)
    try:
        code, reason = await session.converse()
    except ProtocolError as exc:
        code, reason = exc.code, str(exc)
    except StreamClosed as exc:
        code, reason = (1001 if state.draining else 1011), str(exc)
    except Exception as exc:  # a server fault: this stream only
        code, reason = 1011, f"internal error: {type(exc).__name__}: {exc}"
    finally:
        state.sessions.discard(session)
        if session.stream is not None:
            session.stream.close()
        with contextlib.suppress(asyncio.QueueFull):
            session.outbox.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sender, state.send_timeout)
        sender.cancel()
    with contextlib.suppress(Exception):  # a client that stops reading never takes the close frame either
        await asyncio.wait_for(websocket.close(code=code, reason=_reason(reason)), state.send_timeout)


class _State:
    def __init__(self, scheduler: Scheduler, token, max_message: int, max_frames: int, outbox: int,
                 send_timeout: float, max_upload: int):
        self.scheduler, self.model, self.token = scheduler, scheduler.model, token
        self.max_message, self.max_frames, self.outbox = max_message, max_frames, outbox
        self.send_timeout, self.max_upload = send_timeout, max_upload
        self.sessions: set = set()
        self.draining = False

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop accepting; every session finishes its push in flight and closes with 1001."""
        self.draining = True
        for session in list(self.sessions):
            session.stop.set()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)


def create_app(scheduler: Scheduler, token: str | None = None, max_message_bytes: int = 1 << 20,
               max_stream_seconds: float = 3600.0, outbox: int = 32, send_timeout: float = 10.0,
               max_upload_bytes: int = 256 << 20):
    """The Starlette app serving ``scheduler`` (started and stopped with the app's lifespan)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute

    config = scheduler.model.config
    max_frames = math.ceil(max_stream_seconds * config.sampling_rate / config.hop_length)
    state = _State(scheduler, token, max_message_bytes, max_frames, outbox, send_timeout, max_upload_bytes)

    def refuse(request):
        if not _check_token(state, request.headers):
            return JSONResponse({"error": "a bearer token is required (Authorization: Bearer ...)"}, 401)
        if state.draining:
            return JSONResponse({"error": "the server is shutting down"}, 503, headers={"Retry-After": "5"})
        return None

    async def healthz(request):
        return JSONResponse({"status": "draining" if state.draining else "ok",
                             "sample_rate": config.sampling_rate, "codebooks": config.n_codebooks})

    async def metrics(request):
        from .metrics import render

        body, content_type = render(scheduler.metrics())
        return Response(body, media_type=content_type)

    async def whole_file(request, op: str):
        refused = refuse(request)
        if refused is not None:
            return refused
        body = await request.body()
        if len(body) > state.max_upload:
            return JSONResponse({"error": f"the upload may hold at most {state.max_upload} bytes"}, 413)
        try:
            data = await (_encode_file(scheduler, body) if op == "encode" else _decode_file(scheduler, body))
        except Busy as exc:
            return JSONResponse({"error": f"busy: {exc}"}, 503, headers={"Retry-After": "1"})
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        media = "application/octet-stream" if op == "encode" else "audio/wav"
        return Response(data, media_type=media)

    async def encode_file(request):
        return await whole_file(request, "encode")

    async def decode_file(request):
        return await whole_file(request, "decode")

    async def ws_decode(websocket):
        await _websocket_stream(websocket, "decode")

    async def ws_encode(websocket):
        await _websocket_stream(websocket, "encode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics),
                            Route("/v1/encode", encode_file, methods=["POST"]),
                            Route("/v1/decode", decode_file, methods=["POST"]),
                            WebSocketRoute("/v1/decode", ws_decode), WebSocketRoute("/v1/encode", ws_encode)],
                    lifespan=lifespan)
    app.state.dac = state
    return app


async def _encode_file(scheduler: Scheduler, body: bytes) -> bytes:
    """An audio file's bytes -> a ``.dac`` file's bytes (as ``dac-fast encode`` writes it)."""
    from .. import io as aio
    from ..dacfile import DacFile

    config = scheduler.model.config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(body)
        audio, rate = aio.read_audio(path)  # (channels, samples); a clear AudioError (ValueError) if unreadable
    prepared, input_db = aio.prepare_for_encoding(audio, rate, config.sampling_rate)
    codes = await asyncio.gather(*[scheduler.encode(torch.from_numpy(np.ascontiguousarray(ch))) for ch in prepared])
    stacked = torch.stack(codes).numpy().astype(np.uint16)
    dac = DacFile(codes=stacked, input_db=np.array([input_db], np.float32), original_length=audio.shape[-1],
                  sample_rate=rate, chunk_length=stacked.shape[-1], channels=audio.shape[0], padding=True)
    return dac.to_bytes()


async def _decode_file(scheduler: Scheduler, body: bytes) -> bytes:
    """A ``.dac`` file's bytes (read without running pickle code) -> a 16-bit wav file's bytes."""
    from .. import io as aio
    from ..dacfile import DacFile, read_npy_object

    config = scheduler.model.config
    dac = DacFile.from_artifacts(read_npy_object(body), "upload")
    dac.check_fits_model(config.sampling_rate, config.hop_length, config.n_codebooks)
    audio = await asyncio.gather(*[scheduler.decode(torch.from_numpy(ch.astype(np.int64))) for ch in dac.codes])
    restored = aio.restore_after_decoding(torch.stack(audio).numpy(), config.sampling_rate, dac.input_db,
                                          dac.sample_rate, dac.original_length, dac.channels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.wav"
        aio.write_audio(path, restored, dac.sample_rate)
        return path.read_bytes()
