"""Faults and bad input against the real server on 127.0.0.1 (uvicorn serving ``create_app``), each bounded
in time: every stream that completes is checked against the offline decode/encode of its own input alone."""

import asyncio
import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
pytest.importorskip("prometheus_client")

from dac_fast import DacModel  # noqa: E402
from dac_fast.serving import Client, Scheduler, ServerClosed, create_app  # noqa: E402
from tests.reference import synth_audio  # noqa: E402

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    import uvicorn

    model = DacModel.from_preset("16khz", seed=4)
    scheduler = Scheduler(model, decode_slots=2, encode_slots=1, waiting=1)
    app = create_app(scheduler, max_message_bytes=4096, outbox=2, send_timeout=1.0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio"))
    listener = socket.socket()
    # a small send buffer (no autotuning) on the accepted sockets: a client that stops reading fills it quickly
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, scheduler=scheduler, model=model, app=app)
    uv.should_exit = True
    thread.join(30)


def codes_for(seed: int, frames: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, (12, frames))


def expected_audio(model, codes: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.decode(audio_codes=torch.from_numpy(codes)[None]).audio_values[0].numpy()


async def stream_all(client, codes: np.ndarray, sizes) -> np.ndarray:
    session = await client.decode_stream()
    outs, start = [], 0
    for size in sizes:
        outs.append(await session.push(codes[:, start : start + size]))
        start += size
    outs.append(await session.end())
    return np.concatenate(outs)


def active_streams(server) -> int:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return int(float(re.search(r'dac_fast_active_streams\{lane="decode"\} (\S+)', text).group(1)))


def wait_for_active(server, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while active_streams(server) != count:
        assert time.monotonic() < deadline, f"active decode streams stayed {active_streams(server)}, not {count}"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot_others_stay_exact(server):
    codes = codes_for(1, 9)

    async def main():
        client = Client(server.url)
        leaver = await client.decode_stream()
        await leaver.push(codes_for(2, 3))
        staying = asyncio.ensure_future(stream_all(client, codes, [2, 3, 4]))
        await leaver.close()  # gone without "end"
        return await staying

    audio = asyncio.run(main())
    assert np.abs(audio - expected_audio(server.model, codes)).max() <= ATOL
    wait_for_active(server, 0)


def test_pipelined_pushes_each_get_their_own_reply_in_order(server):
    """A client sends all its pushes before reading any reply (more than the server reads ahead, so it also
    meets backpressure): one reply per push, in order, each as long as that push's final samples, and the
    whole exact; a bad push in the pipeline closes only that stream with 1007."""
    from dac_fast.slots import SlotDecoder

    sizes = [1, 2, 3, 1, 4, 2, 2, 1, 3, 1, 1, 2, 4, 1, 1, 2, 3, 1, 1, 2, 1, 1, 2, 1, 3]
    assert len(sizes) > server.scheduler.max_pending
    codes = codes_for(11, sum(sizes))
    final = SlotDecoder(server.model, 1).final_outputs
    edges = np.cumsum([0, *sizes])

    async def main():
        session = await Client(server.url).decode_stream()
        for a, b in zip(edges[:-1], edges[1:]):
            await session.send(codes[:, a:b])
        replies = [await session.receive() for _ in sizes]
        rest = await session.end()
        bad = await Client(server.url).decode_stream()
        await bad.send(codes[:, :2])
        await bad.send(np.full((12, 1), 4096))
        with pytest.raises(ServerClosed) as closed:
            for _ in range(3):
                await bad.receive()
        return replies, rest, closed.value

    server.scheduler.fault = lambda kind: time.sleep(0.05)  # slow ticks: the pushes pile up beyond max_pending
    try:
        replies, rest, closed = asyncio.run(main())
    finally:
        server.scheduler.fault = None
    assert [r.size for r in replies] == [final(b) - final(a) for a, b in zip(edges[:-1], edges[1:])]
    audio = np.concatenate([*replies, rest])
    assert np.abs(audio - expected_audio(server.model, codes)).max() <= ATOL
    assert closed.code == 1007 and "1024" in closed.reason
    wait_for_active(server, 0)


@pytest.mark.parametrize("send,code,message", [
    ("not json", 1007, "JSON"),
    ({"type": "start", "dtype": "float64"}, 1007, "dtype must be one of"),
    ({"type": "start", "codebooks": 13}, 1007, r"codebooks must be an integer in \[1, 12\]"),
    (b"\x01\x02\x03", 1007, "whole int32 values"),
    (np.full((12, 2), 1024, dtype="<i4").T.tobytes(), 1007, r"\[0, 1024\)"),
    (np.zeros((12, 2), dtype="<i4").tobytes()[:-4], 1007, "frames x 12 codes"),
    (np.zeros((12, 100), dtype="<i4").tobytes(), 1009, "at most 4096 bytes"),
    ('{"type": "stop"}', 1007, "type.*end"),
], ids=["not-json", "bad-dtype", "too-many-codebooks", "partial-value", "out-of-range", "partial-frame",
        "too-large", "bad-text"])
def test_malformed_input_closes_only_that_stream(server, send, code, message):
    from websockets.asyncio.client import connect

    codes = codes_for(3, 6)

    async def bad_stream():
        async with connect(f"ws://127.0.0.1:{server.port}/v1/decode") as ws:
            if isinstance(send, dict):
                await ws.send(json.dumps(send))
            elif isinstance(send, str) and send == "not json":
                await ws.send(send)
            else:
                await ws.send('{"type": "start", "dtype": "int32"}')
                await ws.recv()
                await ws.send(send)
            with pytest.raises(Exception):
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
            return ws.close_code, ws.close_reason

    async def main():
        good = asyncio.ensure_future(stream_all(Client(server.url), codes, [3, 3]))
        return await bad_stream(), await good

    (close_code, reason), audio = asyncio.run(main())
    assert close_code == code and re.search(message, reason), (close_code, reason)
    assert np.abs(audio - expected_audio(server.model, codes)).max() <= ATOL


def test_more_streams_than_slots_and_queue_are_refused_with_1013(server):
    async def main():
        client = Client(server.url)
        held = [await client.decode_stream(), await client.decode_stream()]  # both slots
        waiting = asyncio.ensure_future(client.decode_stream())  # the one waiting place
        await asyncio.sleep(0.5)
        with pytest.raises(ServerClosed) as refused:
            await client.decode_stream()
        assert not waiting.done()
        await held[0].close()  # a slot frees: the waiting stream gets it
        third = await asyncio.wait_for(waiting, 20)
        for session in (held[1], third):
            await session.close()
        return refused.value

    refused = asyncio.run(main())
    assert refused.code == 1013 and "busy" in refused.reason
    wait_for_active(server, 0)


def test_client_that_stops_reading_is_dropped(server):
    from websockets.asyncio.client import connect

    codes = codes_for(5, 8)
    lane = server.scheduler.lanes["decode"]

    async def main():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        ws = await connect(f"ws://127.0.0.1:{server.port}/v1/decode", sock=sock, max_queue=1)
        await ws.send('{"type": "start", "dtype": "int32"}')
        slot = json.loads(await ws.recv())["slot"]
        good = asyncio.ensure_future(stream_all(Client(server.url), codes, [4, 4]))
        push = np.ascontiguousarray(codes_for(6, 64).T, dtype="<i4").tobytes()  # its reply: 80 KiB of audio
        deadline = time.monotonic() + 60
        pushes = 0
        while lane.streams.get(slot) is not None and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                await ws.send(push)  # never reading the replies
                pushes += 1
            await asyncio.sleep(0.05)
        dropped = lane.streams.get(slot) is None
        audio = await good
        ws.transport.abort()
        return dropped, pushes, audio

    dropped, pushes, audio = asyncio.run(main())
    assert dropped, f"still served after {pushes} unread pushes"
    assert np.abs(audio - expected_audio(server.model, codes)).max() <= ATOL
    wait_for_active(server, 0, timeout=20)


def test_exception_in_a_tick_fails_its_streams_and_the_server_keeps_serving(server):
    codes = codes_for(7, 5)

    def fail_once(kind, calls=[]):
        calls.append(kind)
        if len(calls) == 1:
            raise RuntimeError("injected fault")

    async def main():
        client = Client(server.url)
        victim = await client.decode_stream()
        server.scheduler.fault = fail_once
        try:
            with pytest.raises(ServerClosed) as failed:
                await victim.push(codes[:, :2])
        finally:
            server.scheduler.fault = None
        return failed.value, await stream_all(client, codes, [2, 3])

    failed, audio = asyncio.run(main())
    assert failed.code == 1011 and "injected fault" in failed.reason
    assert np.abs(audio - expected_audio(server.model, codes)).max() <= ATOL


def test_whole_file_http_round_trip_and_encode_stream(server):
    import soundfile as sf

    sr, hop = 16000, 320
    clip = synth_audio(7 * hop + 45, sr, seed=8)

    async def main():
        client = Client(server.url)
        session = await client.encode_stream(sample_rate=sr)
        parts = [await session.push(clip[i : i + 1000]) for i in range(0, clip.shape[0], 1000)]  # <= 4096 bytes
        parts.append(await session.end())
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([clip, clip * 0.5], 1), sr, format="WAV", subtype="FLOAT")
        dac = await client.encode_file(buffer.getvalue())
        wav = await client.decode_file(dac)
        return np.concatenate(parts, axis=1), dac, wav

    codes, dac, wav = asyncio.run(main())
    with torch.inference_mode():
        expected = server.model.encode(torch.from_numpy(clip)[None, None]).audio_codes[0].numpy()
    assert np.array_equal(codes, expected)
    assert dac[:6] == b"\x93NUMPY"
    audio, rate = sf.read(io.BytesIO(wav))
    assert rate == sr and audio.shape == (clip.shape[0], 2)


def test_sigterm_finishes_the_push_in_flight_and_closes_with_1001(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dac_fast", "serve", "--model", "16khz", "--random-weights",
                             "--seed", "4", "--port", str(port), "--slots", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the server exited"
        assert "listening on" in line
        codes = codes_for(9, 20)

        async def main():
            session = await Client(f"http://127.0.0.1:{port}").decode_stream()
            first = await session.push(codes[:, :12])
            await session.send(codes[:, 12:])
            proc.send_signal(signal.SIGTERM)
            second = await session.receive()  # the push in flight is answered
            with pytest.raises(ServerClosed) as closed:
                await session.receive()
            return np.concatenate([first, second]), closed.value

        audio, closed = asyncio.run(main())
        assert closed.code == 1001
        model = DacModel.from_preset("16khz", seed=4)
        expected = expected_audio(model, codes)
        assert audio.shape[0] == 20 * 320 - 3141  # all the final samples of both pushes (lookahead 3141)
        assert np.abs(audio - expected[: audio.shape[0]]).max() <= ATOL
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_token_and_busy_whole_file_requests(server, tmp_path):
    from dac_fast.dacfile import DacFile

    state = server.app.state.dac
    codes = codes_for(10, 11)
    dac = DacFile(codes=codes[None].astype(np.uint16), input_db=np.array([-20.0], np.float32),
                  original_length=11 * 320, sample_rate=16000, chunk_length=11, channels=1, padding=True)
    body = dac.save(tmp_path / "a.dac").read_bytes()

    async def main():
        state.token = "s3cret"
        try:
            with pytest.raises(ServerClosed) as no_token:
                await Client(server.url).decode_stream()
            with pytest.raises(RuntimeError, match="HTTP 401"):
                await Client(server.url).decode_file(b"x")
            session = await Client(server.url, token="s3cret").decode_stream()
            audio = await session.push(codes)
            await session.close()
        finally:
            state.token = None
        server.scheduler.offline_queue = 0  # every whole-file request now finds the queue full
        try:
            request = urllib.request.Request(server.url + "/v1/decode", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as busy:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=20)
        finally:
            server.scheduler.offline_queue = 32
        return no_token.value, audio, busy.value

    no_token, audio, busy = asyncio.run(main())
    assert no_token.code == 1008 and "bearer token" in no_token.reason
    assert audio.shape == (11 * 320 - 3141,)
    assert busy.code == 503 and busy.headers["Retry-After"] and "busy" in busy.read().decode()
    wait_for_active(server, 0)


@pytest.mark.parametrize("argv,message", [
    (["--host", "0.0.0.0"], "--token TOKEN"),
    (["--slots", "0"], "--slots must be at least 1"),
    ([], "add --random-weights"),
    (["--random-weights", "--coalesce", "0"], "--coalesce must be at least 1"),
    (["--random-weights", "--gather-ms", "-1"], "--gather-ms in [0, 1000]"),
], ids=["public-host-without-token", "no-slots", "preset-without-random-weights", "coalesce", "gather"])
def test_serve_refuses_unsafe_or_bad_arguments_before_loading(argv, message, capsys):
    from dac_fast.cli import main

    assert main(["serve", "--model", "16khz", *argv]) == 2
    assert message in capsys.readouterr().err
