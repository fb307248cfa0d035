"""Concurrent real-time decode streams against ``dac-fast serve`` on loopback, three decode modes side by side:
``slots`` (a tick's pushes in one exact batched step), ``per-stream`` (the same server, one exact model call per
stream's push) and ``windows`` (Orpheus-style: every 7 new frames one ``model.decode`` of a 28-frame window,
all due windows of a tick batched; inexact at the seams).

    python benchmarks/bench_serve.py [--presets 16khz 24khz 44khz] [--pushes 1 4 16] [--streams 1 2 3 4]
                                     [--seconds 4] [--modes slots per-stream windows] [--quick]
                                     [--out benchmarks/results/serve_cpu]

Per preset and mode a server process starts (seeded random weights, fp32, ``--slots`` = the largest stream
count); for each push size and stream count N, N clients connect at once and push codes at real-time pace (a
push of f frames every f / frame_rate seconds, pipelined: a client sends its codes as they come, as a TTS front
end does, and reads the replies as they arrive) for ``--seconds``. Per point: time to first audio (median over
clients), per-push latency p50/p99 (send to reply), underruns (stalls of a player that starts once it holds one
push of audio and resumes after each stall; summed over clients), the server's CPU seconds per second of
streamed audio, and the max abs difference of each client's audio against ``model.decode`` of the codes it
pushed (fp32 rounding for the exact modes, the seams for windows). A client whose oldest unanswered push is more than
``LAG_LIMIT_S`` old stops pushing and ends its stream (the point "fell behind"); larger stream counts of that
(preset, mode, push) are skipped, as they can only do worse. Most streams held per (preset, mode, push): the
largest N with p99 < 300 ms and no underruns. Offline decode throughput (1 / RTF of one 10 s decode) per preset
is the ceiling.

``--quick``: 16khz, 4-frame pushes, 1 2 3 streams (to size a full run). Writes OUT.md, OUT.json and (with
matplotlib) OUT_<preset>.png per preset (p99 latency against streams, a line per mode and push size). Numbers
on a shared machine move with its load: run the full benchmark on a quiet one.
"""

import argparse
import asyncio
import json
import shlex
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

MODES = ["slots", "per-stream", "windows"]
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--presets", nargs="+", choices=["16khz", "24khz", "44khz"], default=["16khz", "24khz", "44khz"])
parser.add_argument("--streams", nargs="+", type=int, default=[1, 2, 3, 4])
parser.add_argument("--pushes", nargs="+", type=int, default=[1, 4, 16])
parser.add_argument("--seconds", type=float, default=4.0, help="audio seconds each client streams")
parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
parser.add_argument("--quick", action="store_true", help="16khz, 4-frame pushes, 1 2 3 streams")
parser.add_argument("--port", type=int, default=8765)
parser.add_argument("--serve-args", default="", metavar="ARGS",
                    help="more `dac-fast serve` arguments for every server, e.g. \"--coalesce 8 --gather-ms 10\"")
parser.add_argument("--out", default="benchmarks/results/serve_cpu")
parser.add_argument("--grouping-only", action="store_true",
                    help="only time how a tick handles different push sizes (in process, no server; first preset)")
SEED = 0
P99_LIMIT_S = 0.3
LAG_LIMIT_S = 1.0  # a client this far behind its real-time schedule cannot recover within a short run
OFFLINE_SECONDS = 10.0


def start_server(preset: str, slots: int, mode: str, port: int, extra: str = "") -> subprocess.Popen:
    argv = [sys.executable, "-m", "dac_fast", "serve", "--model", preset, "--random-weights", "--seed", str(SEED),
            "--port", str(port), "--slots", str(slots), "--queue", "0", "--max-message-bytes", str(1 << 22),
            "--decode-mode", mode, *shlex.split(extra)]
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
    """One client as a TTS front end runs it: codes are sent as they come (a push every push / frame_rate
    seconds, not waiting for replies: pipelined), replies are read as they arrive and played."""
    session = await Client(url).decode_stream()
    start = time.perf_counter()
    sent_at, latencies, outs = [], [], []
    state = {"pushed": 0}

    async def send():
        for begin in range(0, codes.shape[1], push):
            due = start + begin / frame_rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if len(sent_at) > len(latencies) and time.perf_counter() - sent_at[len(latencies)] > LAG_LIMIT_S:
                break  # the server fell behind: end the stream with what was pushed
            sent_at.append(time.perf_counter())
            await session.send(codes[:, begin : begin + push])
            state["pushed"] = min(codes.shape[1], begin + push)

    sender = asyncio.ensure_future(send())
    first_audio = playing_since = None
    received = underruns = 0
    buffer_s = push / frame_rate  # the player starts once it holds one push of audio (its jitter buffer)
    while not (sender.done() and len(latencies) == len(sent_at)):
        if len(latencies) == len(sent_at):  # nothing in flight: wait for the next send
            await asyncio.sleep(0.001)
            continue
        audio = await session.receive()
        now = time.perf_counter()
        latencies.append(now - sent_at[len(latencies)])
        if playing_since is not None and received / sample_rate < now - playing_since:
            underruns += 1  # playback ran dry before this reply came: a stall; it resumes from here
            playing_since = now - received / sample_rate
        if audio.size and first_audio is None:
            first_audio = now
        received += audio.size
        if playing_since is None and received / sample_rate >= buffer_s:
            playing_since = now
        outs.append(audio)
    await sender
    outs.append(await session.end())
    return {"latencies": latencies, "ttfa": (first_audio or time.perf_counter()) - start, "underruns": underruns,
            "frames": state["pushed"], "audio": np.concatenate(outs)}


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


def frames_per_second(config) -> float:
    return config.sampling_rate / config.hop_length  # exact (config.frame_rate rounds 44khz's 86.13 up)


class Reference:
    """``model.decode`` of each client's codes (or of the frames it pushed before falling behind), cached."""

    def __init__(self, model, clips: list):
        self.model, self.clips, self.cache = model, clips, {}

    def error(self, index: int, result: dict) -> float:
        key = (index, result["frames"])
        if key not in self.cache:
            codes = torch.from_numpy(self.clips[index][:, : result["frames"]])[None]
            with torch.inference_mode():
                self.cache[key] = self.model.decode(audio_codes=codes).audio_values[0].numpy()
        expected = self.cache[key]
        if result["audio"].shape != expected.shape:
            return float("inf")
        return float(np.abs(result["audio"] - expected).max())


def offline_rtf(model, rng) -> float:
    """Seconds of compute per second of audio for one warm ``OFFLINE_SECONDS`` decode."""
    config = model.config
    codes = torch.from_numpy(rng.integers(0, config.codebook_size,
                                          (1, config.n_codebooks, round(OFFLINE_SECONDS * frames_per_second(config)))))
    with torch.inference_mode():
        model.decode(audio_codes=codes[..., :20])
        start = time.perf_counter()
        model.decode(audio_codes=codes)
    return (time.perf_counter() - start) / OFFLINE_SECONDS


def measure(proc, url: str, clips: list, push: int, reference: Reference, seconds: float) -> dict:
    """One point: ``len(clips)`` clients streaming at once."""
    config = reference.model.config
    cpu0 = cpu_seconds(proc.pid)
    frame_rate = frames_per_second(config)
    results = asyncio.run(point(url, clips, push, frame_rate, config.sampling_rate))
    cpu = cpu_seconds(proc.pid) - cpu0
    latencies = np.concatenate([r["latencies"] for r in results])
    streamed_s = sum(r["frames"] for r in results) / frame_rate
    return {"push": push, "streams": len(clips), "ttfa_ms": 1000 * float(np.median([r["ttfa"] for r in results])),
            "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "underruns": int(sum(r["underruns"] for r in results)),
            "fell_behind": any(r["frames"] < c.shape[1] for r, c in zip(results, clips)),
            "cpu_per_stream": cpu / max(streamed_s, 1e-9),
            "max_abs_error": max(reference.error(i, r) for i, r in enumerate(results))}


def bench_preset(args, preset: str) -> tuple[list, dict]:
    model = DacModel.from_preset(preset, seed=SEED)
    config = model.config
    rng = np.random.default_rng(1)
    frames = round(args.seconds * frames_per_second(config))
    clips = [rng.integers(0, config.codebook_size, (config.n_codebooks, frames)) for _ in range(max(args.streams))]
    reference = Reference(model, clips)
    rtf = offline_rtf(model, rng)
    rows = []
    for mode in args.modes:
        proc = start_server(preset, max(args.streams), mode, args.port, args.serve_args)
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(point(url, clips[:1], 4, 1e9, config.sampling_rate))  # warm-up, not timed
            for push in args.pushes:
                for n in sorted(args.streams):
                    rows.append({"preset": preset, "mode": mode,
                                 **measure(proc, url, clips[:n], push, reference, args.seconds)})
                    print(json.dumps(rows[-1]), flush=True)
                    if rows[-1]["fell_behind"]:
                        break  # more streams can only fall further behind
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return rows, {"offline_rtf": rtf, "offline_streams_ceiling": 1 / rtf}


def most_held(rows: list) -> dict:
    """(preset, mode, push) -> the most streams with p99 < 300 ms and no underruns (0: not even one)."""
    held = {}
    for row in rows:
        ok = row["p99_ms"] < 1000 * P99_LIMIT_S and row["underruns"] == 0 and not row["fell_behind"]
        key = (row["preset"], row["mode"], row["push"])
        held[key] = max(held.get(key, 0), row["streams"] if ok else 0)
    return held


def markdown(args, rows: list, ceilings: dict, held: dict) -> str:
    lines = [f"# bench_serve: {args.seconds:g} s per client, real-time pace", ""]
    lines += [f"- {preset}: offline decode RTF {c['offline_rtf']:.3f} (ceiling {c['offline_streams_ceiling']:.1f} "
              "real-time streams)" for preset, c in ceilings.items()]
    lines += ["", "| preset | mode | push | streams | TTFA ms | p50 ms | p99 ms | underruns | CPU s / stream-s "
              "| max abs err |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['mode']} | {r['push']} | {r['streams']}{' (fell behind)' * r['fell_behind']} | "
              f"{r['ttfa_ms']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['underruns']} | "
              f"{r['cpu_per_stream']:.2f} | {r['max_abs_error']:.1e} |" for r in rows]
    lines += ["", "Most streams held (p99 < 300 ms, no underruns):", "",
              "| preset | push | " + " | ".join(args.modes) + " |", "|---|---:|" + "---:|" * len(args.modes)]
    for preset in ceilings:
        for push in args.pushes:
            lines.append(f"| {preset} | {push} | "
                         + " | ".join(str(held.get((preset, m, push), "-")) for m in args.modes) + " |")
    return "\n".join(lines)


def plot(rows: list, preset: str, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "PNG skipped: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = sorted({(r["mode"], r["push"]) for r in rows if r["preset"] == preset}, key=lambda k: (k[1], k[0]))
    for mode, push in lines:
        points = [r for r in rows if (r["preset"], r["mode"], r["push"]) == (preset, mode, push)]
        ax.plot([r["streams"] for r in points], [r["p99_ms"] for r in points], marker="o",
                linestyle={"slots": "-", "per-stream": "--", "windows": ":"}[mode], label=f"{mode}, push {push}")
    ax.axhline(1000 * P99_LIMIT_S, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("push latency p99 (ms)")
    ax.set_title(f"dac-fast serve, {preset}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"PNG: {path}"


def main():
    args = parser.parse_args()
    if args.quick:
        args.presets, args.pushes, args.streams = ["16khz"], [4], [1, 2, 3]
    if args.grouping_only:
        for row in grouping(DacModel.from_preset(args.presets[0], seed=SEED)):
            print(json.dumps(row))
        return
    rows, ceilings = [], {}
    for preset in args.presets:
        preset_rows, ceilings[preset] = bench_preset(args, preset)
        rows += preset_rows
    held = most_held(rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "seconds": args.seconds, "ceilings": ceilings,
            "held": {f"{p}/{m}/{push}": v for (p, m, push), v in held.items()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    table = markdown(args, rows, ceilings, held)
    notes = [plot(rows, preset, f"{args.out}_{preset}.png") for preset in args.presets]
    with open(args.out + ".md", "w") as fh:
        fh.write(table + "\n\n" + "\n".join(notes) + "\n")
    print(table)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
