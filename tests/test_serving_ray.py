"""The serving app as a Ray Serve deployment (``dac-fast serve --ray``, ``dac_fast.serving.ray_serve``) on a local
2-CPU Ray: one replica behind Ray Serve's HTTP proxy on 127.0.0.1; WebSocket decode and encode streams through the
proxy equal the offline decode / encode, /healthz answers, the app's own close codes (a missing token: 1008) reach
the client, and SIGTERM deletes the application."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
pytest.importorskip("prometheus_client")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'dac-fast[serve-ray]')")

from dac_fast import DacModel  # noqa: E402
from dac_fast.serving import Client, ServerClosed  # noqa: E402
from dac_fast.serving.ray_serve import APP_NAME, CONTROL_REQUESTS, most_ongoing_requests  # noqa: E402
from tests.reference import synth_audio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
SEED = 5
TOKEN = "test-token"
READY_TIMEOUT_S = 120  # Ray, the Serve controller, the proxy and the replica starting on a loaded 2-core machine
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, process, log: Path) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
                if response.status == 200:
                    return json.loads(response.read())
        except OSError:
            pass
        assert process.poll() is None, f"dac-fast serve --ray exited ({process.returncode}): {log.read_text()}"
        assert time.monotonic() < deadline, f"{url}/healthz did not answer within {READY_TIMEOUT_S} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """``dac-fast serve --ray ADDRESS`` in a subprocess, joined to a 2-CPU local Ray started here."""
    import ray
    from ray import serve

    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        # Ray's workers inherit this: the replica imports dac_fast from this checkout, not another install
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        command = [sys.executable, "-m", "dac_fast", "serve", "--ray", ray.get_runtime_context().gcs_address,
                   "--model", "16khz", "--random-weights", "--seed", str(SEED), "--port", str(port),
                   "--slots", "2", "--encode-slots", "1", "--queue", "1", "--token", TOKEN, "--threads", "1",
                   "--replicas", "1", "--replica-cpus", "1", "--replica-gpus", "0"]
        log = tmp_path_factory.mktemp("serve") / "output.txt"  # a file: a full pipe would block the server
        with log.open("w") as sink:
            process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_health(url, process, log)
        yield SimpleNamespace(url=url, health=health, process=process, log=log, serve=serve)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return DacModel.from_preset("16khz", seed=SEED)  # the replica's model: same preset, same seed


def test_decode_stream_through_the_ray_serve_proxy_is_exact(ray_server, model):
    url, health = ray_server.url, ray_server.health
    assert health["status"] == "ok" and health["sample_rate"] == 16000 and health["codebooks"] == 12
    rng = np.random.default_rng(11)
    frames = int(rng.integers(7, 12))
    codes = rng.integers(0, 1024, (12, frames))
    sizes = [1, 2, frames - 3]

    async def stream():
        session = await Client(url, token=TOKEN).decode_stream()
        outs, start = [], 0
        for size in sizes:
            outs.append(await session.push(codes[:, start : start + size]))
            start += size
        outs.append(await session.end())
        return session.ready, np.concatenate(outs)

    ready, audio = asyncio.run(asyncio.wait_for(stream(), 120))
    with torch.inference_mode():
        expected = model.decode(audio_codes=torch.from_numpy(codes)[None]).audio_values[0].numpy()
    assert ready["codebooks"] == 12 and ready["slot"] in (0, 1)
    assert audio.shape == expected.shape
    assert np.abs(audio - expected).max() <= ATOL


def test_encode_stream_through_the_ray_serve_proxy_gives_the_offline_codes(ray_server, model):
    clip = synth_audio(5 * 320 + 77, 16000, seed=9)
    pushes = [0, 700, 1500, clip.shape[0]]  # uneven: codes come out as whole frames are covered

    async def stream():
        session = await Client(ray_server.url, token=TOKEN).encode_stream(sample_rate=16000)
        parts = [await session.push(clip[a:b]) for a, b in zip(pushes, pushes[1:])]
        parts.append(await session.end())
        return np.concatenate(parts, axis=1)

    codes = asyncio.run(asyncio.wait_for(stream(), 120))
    with torch.inference_mode():
        expected = model.encode(torch.from_numpy(clip)[None, None]).audio_codes[0].numpy()
    assert np.array_equal(codes, expected)


def test_the_apps_close_codes_pass_through_the_proxy(ray_server):
    url = ray_server.url

    async def stream_without_token():
        session = await Client(url).decode_stream()
        await session.push(np.zeros((12, 1), np.int64))

    with pytest.raises(ServerClosed) as caught:
        asyncio.run(asyncio.wait_for(stream_without_token(), 60))
    assert caught.value.code == 1008 and "token" in caught.value.reason


def test_a_replica_takes_every_stream_its_scheduler_holds_or_queues():
    options = {"decode_slots": 3, "encode_slots": 2, "waiting": 4, "offline_queue": 5}
    assert most_ongoing_requests(options) == 3 + 2 + 2 * 4 + 5 + CONTROL_REQUESTS  # `waiting` is per lane


def test_sigterm_stops_serving_and_deletes_only_its_application(ray_server):  # last: it stops the server
    process = ray_server.process
    process.send_signal(signal.SIGTERM)
    process.wait(120)
    output = ray_server.log.read_text()
    assert process.returncode == 0, output
    assert f"listening on {ray_server.url}" in output
    assert APP_NAME not in ray_server.serve.status().applications


def test_bad_ray_arguments_are_refused_before_ray_starts():
    base = [sys.executable, "-m", "dac_fast", "serve", "--ray", "--model", "16khz", "--random-weights"]
    for extra, message in [(["--replicas", "0"], "--replicas must be at least 1"),
                           (["--replica-gpus", "-1"], "--replica-gpus at least 0"),
                           (["--port", "0"], "--port a fixed port")]:
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
