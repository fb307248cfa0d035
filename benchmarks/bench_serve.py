"""Concurrent real-time decode streams against ``dac-fast serve`` on loopback: slot batching against one model
call per stream (the same server with ``--no-slot-batching``).

    python benchmarks/bench_serve.py [--preset 16khz] [--streams 1 2 4 8] [--pushes 4] [--seconds 6]
                                     [--modes slots per-stream] [--out benchmarks/results/serve_cpu]

For each mode a server process starts (seeded random weights, fp32, ``--slots`` = the largest stream count);
for each push size and stream count N, N clients connect at once and push codes at real-time pace (a push of f
frames every f / frame_rate seconds) for ``--seconds``. Per point: time to first audio (median over clients),
per-push latency p50/p99 (send to reply), underruns (stalls of a player that starts once it holds one push
of audio and resumes after each stall; summed over clients), the server's CPU seconds per stream per second
of audio, and exactness (each client's audio against ``model.decode`` of its codes, max abs difference). The
last column per mode and push size is the most streams held in real time: p99 < 300 ms and no underruns.
Offline decode throughput (1 / RTF of one 10 s decode) is printed beside it as the ceiling.

Writes OUT.md, OUT.json and (with matplotlib) OUT.png (p99 latency against streams). Short runs only: numbers
on a shared 2-core machine move with its load.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dac_fast import DacModel  # noqa: E402
from dac_fast.serving import Client  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="16khz")
parser.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8])
parser.add_argument("--pushes", nargs="+", type=int, default=[4])
parser.add_argument("--seconds", type=float, default=6.0, help="audio seconds each client streams")
parser.add_argument("--modes", nargs="+", choices=["slots", "per-stream"], default=["slots", "per-stream"])
parser.add_argument("--port", type=int, default=8765)
parser.add_argument("--out", default="benchmarks/results/serve_cpu")
parser.add_argument("--grouping-only", action="store_true",
                    help="only time how a tick handles different push sizes (in process, no server)")
SEED = 0
P99_LIMIT_S = 0.3


def start_server(preset: str, slots: int, batching: bool, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dac_fast", "serve", "--model", preset, "--random-weights", "--seed", str(SEED),
            "--port", str(port), "--slots", str(slots), "--queue", "0", "--max-message-bytes", str(1 << 22)]
    if not batching:
        argv.append("--no-slot-batching")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client_run(url: str, codes: np.ndarray, push: int, frame_rate: float, sample_rate: int) -> dict:
    session = await Client(url).decode_stream()
    start = time.perf_counter()
    latencies, outs = [], []
    first_audio = playing_since = None
    received = underruns = 0
    buffer_s = push / frame_rate  # the player starts once it holds one push of audio (its jitter buffer)
    for begin in range(0, codes.shape[1], push):
        due = start + begin / frame_rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sent = time.perf_counter()
        audio = await session.push(codes[:, begin : begin + push])
        now = time.perf_counter()
        latencies.append(now - sent)
        if playing_since is not None and received / sample_rate < now - playing_since:
            underruns += 1  # playback ran dry before this reply came: a stall; it resumes from here
            playing_since = now - received / sample_rate
        if audio.size and first_audio is None:
            first_audio = now
        received += audio.size
        if playing_since is None and received / sample_rate >= buffer_s:
            playing_since = now
        outs.append(audio)
    outs.append(await session.end())
    return {"latencies": latencies, "ttfa": (first_audio or time.perf_counter()) - start, "underruns": underruns,
            "audio": np.concatenate(outs)}


async def point(url: str, clips: list, push: int, frame_rate: float, sample_rate: int) -> list:
    return await asyncio.gather(*[client_run(url, c, push, frame_rate, sample_rate) for c in clips])


def grouping(model, slots: int = 4, rounds: int = 7) -> list:
    """One tick of ``slots`` warm streams, three ways: every slot pushing 4 frames (one batched group), half
    pushing 4 and half 2 (two groups in one call, the documented choice), and every slot as its own call (no
    slot batching). Median ms per tick over ``rounds`` interleaved rounds."""
    from dac_fast.slots import SlotDecoder

    n = model.config.n_codebooks
    codes = torch.randint(0, model.config.codebook_size, (slots, n, 4 * (rounds + 4)))
    cases = {"uniform 4 frames": [4] * slots, "mixed 4 and 2 frames": [4, 2] * (slots // 2)}
    decoders = {name: SlotDecoder(model, slots) for name in [*cases, "one call per slot"]}
    times = {name: [] for name in decoders}
    with torch.inference_mode():
        for r in range(rounds + 3):  # 3 warm-up rounds (past the decoder's first crops)
            for name, dec in decoders.items():
                sizes = cases.get(name, [4] * slots)
                inputs = [codes[i, :, 4 * r : 4 * r + size] for i, size in enumerate(sizes)]
                t0 = time.perf_counter()
                if name == "one call per slot":
                    for i in range(slots):
                        dec.push([x if j == i else None for j, x in enumerate(inputs)])
                else:
                    dec.push(inputs)
                if r >= 3:
                    times[name].append(1000 * (time.perf_counter() - t0))
    return [{"tick": name, "slots": slots, "ms": float(np.median(t))} for name, t in times.items()]


def main():
    args = parser.parse_args()
    model = DacModel.from_preset(args.preset, seed=SEED)
    if args.grouping_only:
        for row in grouping(model):
            print(json.dumps(row))
        return
    config = model.config
    frame_rate = config.sampling_rate / config.hop_length
    frames = int(args.seconds * frame_rate)
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, config.codebook_size, (config.n_codebooks, frames)) for _ in range(max(args.streams))]
    with torch.inference_mode():
        expected = [model.decode(audio_codes=torch.from_numpy(c)[None]).audio_values[0].numpy() for c in clips]
        ten = torch.from_numpy(rng.integers(0, config.codebook_size, (1, config.n_codebooks, int(10 * frame_rate))))
        model.decode(audio_codes=ten[..., :20])
        t0 = time.perf_counter()
        model.decode(audio_codes=ten)
        offline_rtf = (time.perf_counter() - t0) / 10
    rows = []
    for mode in args.modes:
        proc = start_server(args.preset, max(args.streams), mode == "slots", args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(point(url, clips[:1], 4, 1e9, config.sampling_rate))  # warm-up, not timed
            for push in args.pushes:
                for n in args.streams:
                    cpu0 = cpu_seconds(proc.pid)
                    results = asyncio.run(point(url, clips[:n], push, frame_rate, config.sampling_rate))
                    cpu = cpu_seconds(proc.pid) - cpu0
                    latencies = np.concatenate([r["latencies"] for r in results])
                    error = max(float(np.abs(r["audio"] - e).max()) for r, e in zip(results, expected))
                    rows.append({"mode": mode, "push": push, "streams": n,
                                 "ttfa_ms": 1000 * float(np.median([r["ttfa"] for r in results])),
                                 "p50_ms": 1000 * float(np.percentile(latencies, 50)),
                                 "p99_ms": 1000 * float(np.percentile(latencies, 99)),
                                 "underruns": int(sum(r["underruns"] for r in results)),
                                 "cpu_per_stream": cpu / n / args.seconds, "max_abs_error": error})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    held = {}
    for row in rows:
        ok = row["p99_ms"] < 1000 * P99_LIMIT_S and row["underruns"] == 0
        key = (row["mode"], row["push"])
        held[key] = max(held.get(key, 0), row["streams"] if ok else 0)
    meta = {"preset": args.preset, "seconds": args.seconds, "offline_rtf": offline_rtf,
            "offline_streams_ceiling": 1 / offline_rtf, "torch_threads": torch.get_num_threads(),
            "held": {f"{m}/{p}": v for (m, p), v in held.items()}}
    lines = [f"# bench_serve: {args.preset}, {args.seconds:g} s per client, real-time pace",
             "", f"Offline decode RTF {offline_rtf:.3f} (ceiling {1 / offline_rtf:.1f} real-time streams).", "",
             "| mode | push | streams | TTFA ms | p50 ms | p99 ms | underruns | CPU s / stream-s | max abs err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['push']} | {r['streams']} | {r['ttfa_ms']:.0f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['underruns']} | {r['cpu_per_stream']:.2f} | {r['max_abs_error']:.1e} |"
              for r in rows]
    lines += ["", "Most streams held (p99 < 300 ms, no underruns): "
              + ", ".join(f"{m} push {p}: {v}" for (m, p), v in held.items())]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (mode, push) in held:
        points = [r for r in rows if r["mode"] == mode and r["push"] == push]
        ax.plot([r["streams"] for r in points], [r["p99_ms"] for r in points], marker="o", label=f"{mode}, push {push}")
    ax.axhline(1000 * P99_LIMIT_S, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("push latency p99 (ms)")
    ax.set_title(f"dac-fast serve, {args.preset}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png")


if __name__ == "__main__":
    main()
