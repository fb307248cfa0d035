"""A Python client of ``dac-fast serve`` (websockets for streams, the standard library for whole files)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np


class ServerClosed(RuntimeError):
    """The server closed the stream: ``code`` (the WebSocket close code) and ``reason`` say why."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(f"the server closed the stream ({code}): {reason}")
        self.code, self.reason = code, reason


class StreamSession:
    """One open stream. ``await push(x)`` sends one push and returns its reply; ``send`` / ``receive`` split
    that for clients that pipeline; ``await end()`` returns the rest and closes."""

    def __init__(self, connection, kind: str, ready: dict, dtype: str):
        self.connection, self.kind, self.ready = connection, kind, ready
        self.dtype = np.dtype(dtype).newbyteorder("<")

    async def send(self, values) -> None:
        array = np.asarray(values)
        if self.kind == "decode":  # codes (n, f) -> frame-major
            array = array.T
        await self._guard(self.connection.send(np.ascontiguousarray(array, dtype=self.dtype).tobytes()))

    async def receive(self) -> np.ndarray:
        message = await self._guard(self.connection.recv())
        if isinstance(message, str):
            raise RuntimeError(f"expected a binary reply, got {message[:200]!r}")
        if self.kind == "decode":
            return np.frombuffer(message, dtype="<f4")
        return np.frombuffer(message, dtype="<u2").reshape(-1, self.ready["codebooks"]).T

    async def push(self, values) -> np.ndarray:
        """Decode: codes (n, f) -> float32 samples (k,). Encode: samples (s,) -> uint16 codes (n, f)."""
        await self.send(values)
        return await self.receive()

    async def end(self) -> np.ndarray:
        """The stream's last output; the server then closes the stream."""
        await self._guard(self.connection.send(json.dumps({"type": "end"})))
        rest = await self.receive()
        done = json.loads(await self._guard(self.connection.recv()))
        if done.get("type") != "done":
            raise RuntimeError(f"expected done, got {done!r}")
        await self.connection.close()
        return rest

    async def close(self) -> None:
        await self.connection.close()

    async def _guard(self, awaitable):
        from websockets.exceptions import ConnectionClosed

        try:
            return await awaitable
        except ConnectionClosed as exc:
            close = exc.rcvd
            raise ServerClosed(close.code if close else None, close.reason if close else "connection lost") from None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.connection.close()


class Client:
    """``Client("http://127.0.0.1:8000", token=None)``: ``await decode_stream()`` / ``await encode_stream()``
    open WebSocket streams; ``encode_file`` / ``decode_file`` post whole files."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _open(self, kind: str, start: dict, dtype: str) -> StreamSession:
        from websockets.asyncio.client import connect

        uri = "ws" + self.url[len("http"):] + f"/v1/{kind}"
        connection = await connect(uri, additional_headers=self._headers(), open_timeout=self.timeout,
                                   max_size=64 << 20)
        session = StreamSession(connection, kind, {}, dtype)
        await session._guard(connection.send(json.dumps({"type": "start", **start})))
        session.ready = json.loads(await session._guard(connection.recv()))
        return session

    async def decode_stream(self, codebooks: int | None = None, dtype: str = "int32") -> StreamSession:
        """A decode stream (codes (n, f) in, float32 samples out)."""
        start = {"dtype": dtype} if codebooks is None else {"dtype": dtype, "codebooks": codebooks}
        return await self._open("decode", start, dtype)

    async def encode_stream(self, sample_rate: int | None = None) -> StreamSession:
        """An encode stream (float32 mono samples at the model's rate in, uint16 codes (n, f) out)."""
        start = {"dtype": "float32", "channels": 1}
        if sample_rate is not None:
            start["sample_rate"] = sample_rate
        return await self._open("encode", start, "float32")

    def _post(self, path: str, body: bytes) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None

    async def encode_file(self, audio_file_bytes: bytes) -> bytes:
        """A wav/flac file's bytes -> the ``.dac`` file's bytes."""
        return await asyncio.to_thread(self._post, "/v1/encode", audio_file_bytes)

    async def decode_file(self, dac_file_bytes: bytes) -> bytes:
        """A ``.dac`` file's bytes -> a 16-bit wav file's bytes."""
        return await asyncio.to_thread(self._post, "/v1/decode", dac_file_bytes)
