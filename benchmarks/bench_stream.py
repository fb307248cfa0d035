"""Streaming decode and encode against one offline call and against the window approaches in use today.

    python benchmarks/bench_stream.py [--presets 44khz 24khz 16khz] [--seconds 20] [--pushes 1 4 16 64]
                                      [--growing-seconds S] [--allocator tuned|default|both] [--rounds R]
                                      [--stream-only] [--quick] [--out benchmarks/results/stream_cpu]

For each preset (seeded random weights in the real shapes, batch 1, fp32, the same codes for every approach):

- dac_fast's streaming decoder at each push size: per-push latency p50/p99, real-time factor (compute /
  audio duration), total compute against one offline ``decode``, max abs error and SNR against it;
- Parler-TTS style: every ``--window-step`` new frames, re-decode ALL frames so far and emit the new audio
  except the last ``hop * step // 6`` samples (Parler's streamer holds back a stride of the newest audio).
  Its cost is quadratic in the length: ``--growing-seconds S`` runs it on the first S seconds of the same
  codes only, against an offline decode of those S seconds (the row says so);
- Orpheus / audio.cpp style: every 7 new frames decode a window of 28 frames (7 frames left context, the 7
  frames emitted, 14 frames right context) and emit those 7 frames' audio;
- the streaming encoder (push of 16 frames' samples and an odd size): code agreement with offline ``encode``
  and compute against it.

Timing: one warm-up (a short offline decode and a short stream, so that weight caches are built outside the
timed runs), the offline decode and encode as the best of two calls (conservative for the stream's ratios),
each stream once (``--rounds R``: R rounds per push size of one offline decode and the stream back to back,
each ratio against its own offline call, the median round reported and every round's ratio in the JSON);
``--allocator tuned`` (default) sets glibc's allocator as the CLI does
(``dac_fast.runtime.tune_allocator``), for every approach alike; ``default`` leaves glibc's settings alone.
``--allocator both``: mallopt is process-wide, so each preset runs in two child processes, default then tuned,
only the offline decode and the stream rows, ``--rounds`` each; OUT.md gets, per push size, the default/tuned
ratio of the streaming cost (the median round's push and flush seconds), minor page faults per push, and the
1-minute load average at each child's start. On a shared machine run it with OMP_NUM_THREADS=1: torch threads
that wait for cores others hold spin, and a stream's time then varies many-fold from run to run.

``--quick``: 44khz only, pushes 4/16/64. Writes OUT.md, OUT.json and (with matplotlib) OUT.png.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--presets", nargs="+", default=["44khz", "24khz", "16khz"])
parser.add_argument("--seconds", type=float, default=20.0)
parser.add_argument("--pushes", nargs="+", type=int, default=[1, 4, 16, 64])
parser.add_argument("--window-step", type=int, default=16, help="new frames per Parler-style re-decode")
parser.add_argument("--growing-seconds", type=float, default=None,
                    help="run the (quadratic) Parler-style baseline on the first S seconds only")
parser.add_argument("--allocator", choices=["tuned", "default", "both"], default="tuned")
parser.add_argument("--stream-only", action="store_true",
                    help="only the offline decode and the stream rows (what --allocator both compares)")
parser.add_argument("--rounds", type=int, default=1,
                    help="stream rows: rounds of (offline decode, stream) back to back; the median round's ratio")
parser.add_argument("--quick", action="store_true")
parser.add_argument("--out", default="benchmarks/results/stream_cpu")
args = parser.parse_args()
if args.quick:
    args.presets, args.pushes = ["44khz"], [4, 16, 64]

if args.allocator != "both":
    from dac_fast.runtime import allocator_setting  # imports no torch: mallopt before torch allocates

    ALLOCATOR = allocator_setting(args.allocator)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dac_fast import DacModel  # noqa: E402
from dac_fast.serving.windows import decode_windows  # noqa: E402
from tests.reference import synth_audio  # noqa: E402


def error_stats(audio: torch.Tensor, reference: torch.Tensor) -> dict:
    n = min(audio.shape[-1], reference.shape[-1])
    diff = (audio[..., :n] - reference[..., :n]).double()
    noise = diff.pow(2).sum().item()
    snr = math.inf if noise == 0 else 10 * math.log10(reference[..., :n].double().pow(2).sum().item() / noise)
    return {"max_abs_error": diff.abs().max().item(), "snr_db": snr, "length": audio.shape[-1],
            "length_offline": reference.shape[-1]}


def latency_stats(times: list, total: float, offline: float, duration: float) -> dict:
    return {"pushes": len(times), "p50_ms": 1e3 * float(np.percentile(times, 50)),
            "p99_ms": 1e3 * float(np.percentile(times, 99)), "total_s": total, "rtf": total / duration,
            "x_offline": total / offline}


def run_pushes(stream, inputs, push: int):
    """Push ``inputs`` into a streaming decoder or encoder ``push`` elements at a time, then flush: (output, the
    time of each call)."""
    outs, times = [], []
    calls = [lambda s=start: stream.push(inputs[..., s : s + push]) for start in range(0, inputs.shape[-1], push)]
    for call in calls + [stream.flush]:
        t = time.perf_counter()
        outs.append(call())
        times.append(time.perf_counter() - t)
    return torch.cat(outs, -1), times


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_stream(model, codes, push: int):
    """The streaming decoder at ``push``-frame pushes: (audio, the time of each call, minor page faults)."""
    faults = minor_faults()
    out, times = run_pushes(model.streaming_decoder(), codes, push)
    return out, times, minor_faults() - faults


def run_growing(model, codes, step: int):
    """Parler-TTS style: re-decode everything so far at each step, emit all but a held-back stride."""
    hop = model.config.hop_length
    holdback = hop * step // 6
    outs, times, emitted = [], [], 0
    n = codes.shape[-1]
    for stop in list(range(step, n, step)) + [n]:
        t = time.perf_counter()
        audio = model.decode(audio_codes=codes[..., :stop]).audio_values
        end = audio.shape[-1] if stop == n else max(emitted, audio.shape[-1] - holdback)
        outs.append(audio[..., emitted:end])
        emitted = end
        times.append(time.perf_counter() - t)
    return torch.cat(outs, -1), times


def run_sliding(model, codes):
    """Orpheus / audio.cpp style (``dac_fast.serving.windows``): windows of 7 left + 7 new + 14 right frames,
    each emitting its new frames' audio."""
    outs, times = [], []
    start = time.perf_counter()
    for samples in decode_windows(model, codes):
        outs.append(samples)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return torch.cat(outs, -1), times


def run_encoder(model, audio, push: int):
    return run_pushes(model.streaming_encoder(), audio, push)


def best_of_two(call):
    """(seconds of the faster of two calls, the result)."""
    times = []
    for _ in range(2):
        t = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t)
    return min(times), result


def paired_rounds(model, codes, push: int, decode_s: float):
    """The stream at ``push``-frame pushes. With --rounds R > 1: R rounds of (one offline decode, the stream)
    back to back, each stream timed against the offline call just before it; returns the median round's
    (audio, push times, offline seconds, minor page faults) and every round's ratio. With R = 1: one stream
    against ``decode_s``."""
    if args.rounds <= 1:
        out, times, faults = run_stream(model, codes, push)
        return out, times, decode_s, faults, [sum(times) / decode_s]
    rounds = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        model.decode(audio_codes=codes)
        offline_s = time.perf_counter() - t
        out, times, faults = run_stream(model, codes, push)
        rounds.append((sum(times) / offline_s, offline_s, out, times, faults))
    rounds.sort(key=lambda r: r[0])
    ratio, offline_s, out, times, faults = rounds[len(rounds) // 2]
    return out, times, offline_s, faults, [round(r[0], 3) for r in rounds]


def growing_row(model, codes, reference, decode_s: float, base: dict) -> dict:
    """The Parler-style row, on the first --growing-seconds of the codes when given (quadratic cost)."""
    approach = f"Parler-style growing window, step {args.window_step}"
    duration = base["seconds"]
    if args.growing_seconds is not None and args.growing_seconds < duration:
        frames = round(args.growing_seconds * model.config.sampling_rate / model.config.hop_length)
        codes = codes[..., :frames]
        decode_s, reference = best_of_two(lambda: model.decode(audio_codes=codes).audio_values)
        duration = reference.shape[-1] / model.config.sampling_rate
        approach += f", first {duration:.1f} s only"
    out, times = run_growing(model, codes, args.window_step)
    return {**base, "approach": approach, **latency_stats(times, sum(times), decode_s, duration),
            **error_stats(out, reference)}


def bench_preset(preset: str) -> list:
    model = DacModel.from_preset(preset, seed=1)
    sr, hop = model.config.sampling_rate, model.config.hop_length
    audio = torch.from_numpy(synth_audio(int(args.seconds * sr), sr, seed=0))[None, None]
    duration = audio.shape[-1] / sr
    rows = []
    with torch.inference_mode():
        warm_up = model.encode(audio[..., : 2 * sr]).audio_codes  # builds the weight caches outside the timing
        model.decode(audio_codes=warm_up)
        run_stream(model, warm_up, 16)
        encode_s, codes = best_of_two(lambda: model.encode(audio).audio_codes)
        decode_s, reference = best_of_two(lambda: model.decode(audio_codes=codes).audio_values)
        base = {"preset": preset, "seconds": duration, "frames": codes.shape[-1]}
        rows.append({**base, "approach": "offline decode", "total_s": decode_s, "rtf": decode_s / duration,
                     "x_offline": 1.0, "max_abs_error": 0.0, "snr_db": math.inf})
        for push in args.pushes:
            out, times, offline_s, faults, ratios = paired_rounds(model, codes, push, decode_s)
            rows.append({**base, "approach": f"dac_fast stream, {push}-frame pushes", "minor_faults": faults,
                         **latency_stats(times, sum(times), offline_s, duration), **error_stats(out, reference),
                         **({"x_offline_rounds": ratios} if args.rounds > 1 else {})})
            print(rows[-1], flush=True)
        if args.stream_only:
            return rows
        rows.append(growing_row(model, codes, reference, decode_s, base))
        print(rows[-1], flush=True)
        out, times = run_sliding(model, codes)
        rows.append({**base, "approach": "Orpheus-style sliding window, 28 frames per 7 new",
                     **latency_stats(times, sum(times), decode_s, duration), **error_stats(out, reference)})
        print(rows[-1], flush=True)
        rows.append({**base, "approach": "offline encode", "total_s": encode_s, "rtf": encode_s / duration,
                     "x_offline": 1.0, "code_agreement": 1.0})
        for push in (16 * hop, 16 * hop + 37):
            got, times = run_encoder(model, audio, push)
            same = got.shape == codes.shape
            rows.append({**base, "approach": f"dac_fast stream encoder, {push}-sample pushes",
                         **latency_stats(times, sum(times), encode_s, duration),
                         "code_agreement": (got == codes).float().mean().item() if same else 0.0,
                         "codes_identical": bool(same and torch.equal(got, codes))})
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list) -> str:
    lines = ["| preset | approach | pushes | p50 ms | p99 ms | RTF | x offline | max abs err | SNR dB | codes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else ""
        codes = ""
        if "code_agreement" in r:
            codes = "identical" if r.get("codes_identical", r["code_agreement"] == 1.0) else f"{r['code_agreement']:.5f}"
        lines.append(f"| {r['preset']} | {r['approach']} | {f('pushes', 'd')} | {f('p50_ms', '.1f')} | "
                     f"{f('p99_ms', '.1f')} | {f('rtf', '.3f')} | {f('x_offline', '.2f')} | "
                     f"{f('max_abs_error', '.2e')} | {f('snr_db', '.1f')} | {codes} |")
    return "\n".join(lines)


def plot(rows: list, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is not installed"
    decode_rows = [r for r in rows if "p50_ms" in r and "encoder" not in r["approach"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 1.5 + 0.33 * len(decode_rows)), sharey=True)
    labels = [f"{r['preset']}: {r['approach'].replace(' frames per ', '/')}" for r in decode_rows]
    ax1.barh(labels, [r["p99_ms"] for r in decode_rows])
    ax1.set_xlabel("p99 latency per step (ms)")
    ax2.barh(labels, [max(r["max_abs_error"], 1e-9) for r in decode_rows])
    ax2.set_xscale("log")
    ax2.set_xlabel("max abs error vs offline decode")
    fig.tight_layout()
    fig.savefig(path)
    return f"PNG: {path}"


def compare_allocators():
    """--allocator both: each preset's offline decode and streams in a child process per setting (mallopt is
    process-wide), default then tuned; the default/tuned ratio of each stream's cost."""
    lines = ["| preset | push | stream s, default | stream s, tuned | default / tuned | x offline, default | "
             "x offline, tuned | page faults per push, default / tuned | load (1 min) at start, default / tuned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    runs = {}
    for preset in args.presets:
        for kind in ("default", "tuned"):
            out = f"{args.out}_{preset}_{kind}"
            load = os.getloadavg()[0]
            subprocess.run([sys.executable, os.path.abspath(__file__), "--presets", preset, "--seconds",
                            str(args.seconds), "--pushes", *map(str, args.pushes), "--rounds", str(args.rounds),
                            "--allocator", kind, "--stream-only", "--out", out], check=True, cwd=ROOT)
            with open(out + ".json") as fh:
                rows = [r for r in json.load(fh)["rows"] if "minor_faults" in r]
            runs[preset, kind] = (load, rows)
        (load_d, default), (load_t, tuned) = runs[preset, "default"], runs[preset, "tuned"]
        for d, t in zip(default, tuned):
            lines.append(f"| {preset} | {d['approach'].split(', ')[1]} | {d['total_s']:.3f} | {t['total_s']:.3f} | "
                         f"{d['total_s'] / t['total_s']:.2f} | {d['x_offline']:.2f} | {t['x_offline']:.2f} | "
                         f"{d['minor_faults'] / d['pushes']:.0f} / {t['minor_faults'] / t['pushes']:.0f} | "
                         f"{load_d:.2f} / {load_t:.2f} |")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "load_average_at_end": os.getloadavg()}
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "runs": {f"{p}/{k}": rows for (p, k), (_, rows) in runs.items()}}, fh, indent=1)
    table = "\n".join(lines)
    with open(args.out + ".md", "w") as fh:
        fh.write(f"{meta}\n\n{table}\n")
    print(table)


def main():
    if args.allocator == "both":
        return compare_allocators()
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "allocator": ALLOCATOR,
            "load_average": os.getloadavg()}
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    note = plot(rows, args.out + ".png")
    table = markdown(rows)
    with open(args.out + ".md", "w") as fh:
        fh.write(f"{meta}\n\n{table}\n\n{note}\n")
    print(table)
    print(note)


if __name__ == "__main__":
    main()
