"""File-pipeline throughput: files/s and audio hours per hour for encode_files / decode_files.

    .venv/bin/python benchmarks/bench_files.py [--preset 16khz] [--files 16] [--seconds 2]
        [--threads 2] [--device cpu] [--batch-sizes 1 8] [--buckets exact mask] [--variable] [--json out.json]

Generates a synthetic corpus (speech-like and music-like clips from dac_fast.demo, equal
lengths as in segmented datasets, at a non-model rate so resampling is included), then times
encode_files and decode_files end to end (read, resample, loudness, model, write) at each
batch size. Prints a markdown table and JSON. The glibc allocator is tuned as the CLI does
(mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1); the model uses seeded random weights
(timings do not depend on weight values).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class NullModel:
    """Instant stand-in with a real model's config: isolates the pipeline's own cost
    (read, resample, loudness, batching, .dac/.wav writes) from the network's."""

    def __init__(self, config):
        import torch

        self.config = config
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def eval(self):
        return self

    def encode(self, x, n_quantizers=None, return_dict=None, **kw):
        import torch
        from types import SimpleNamespace

        hop = int(np.prod(self.config.downsampling_ratios))
        return SimpleNamespace(audio_codes=torch.zeros(x.shape[0], n_quantizers or self.config.n_codebooks,
                                                       x.shape[-1] // hop, dtype=torch.long))

    def decode(self, audio_codes=None, return_dict=None, **kw):
        import torch
        from types import SimpleNamespace

        hop = int(np.prod(self.config.downsampling_ratios))
        t = torch.arange(audio_codes.shape[-1] * hop, dtype=torch.float32)
        return SimpleNamespace(audio_values=(0.1 * torch.sin(t * 0.05)).expand(audio_codes.shape[0], -1))


def make_corpus(d: Path, n: int, seconds: float, sr: int, variable: bool):
    import soundfile as sf

    from dac_fast.demo import chord, drum, speech_like

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0.0
    for i in range(n):
        s = seconds * (0.5 + rng.random()) if variable else seconds
        kind = i % 3
        if kind == 0:
            x = speech_like(sr, s, seed=i)
        elif kind == 1:
            x = chord(sr, s, root=110 * (1 + i % 5), seed=i)
        else:
            x = drum(sr, s, seed=i) * 0.5 + chord(sr, s, seed=i) * 0.5
        x = x[: int(sr * s)]
        sf.write(d / f"clip{i:04d}.flac", x.astype(np.float32), sr)
        total += x.size / sr
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="16khz")
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--source-rate", type=int, default=22050)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variable", action="store_true", help="variable lengths (0.5x-1.5x) instead of equal")
    ap.add_argument("--buckets", nargs="+", default=["exact"], choices=["exact", "mask", "pad"],
                    help="encode_files bucket modes to time side by side (decode runs once per batch size)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--null-model", action="store_true",
                    help="also time the pipeline alone with an instant stand-in model (same config)")
    args = ap.parse_args(argv)

    from dac_fast.runtime import tune_allocator

    tuned = tune_allocator()
    import torch

    torch.set_num_threads(args.threads)
    from dac_fast.batch import decode_files, encode_files, load_model

    model = load_model(args.preset, args.device, quiet=True)
    work = Path(tempfile.mkdtemp(prefix="bench_files_"))
    try:
        make_corpus(work / "audio", args.files, args.seconds, args.source_rate, args.variable)
        # warm-up (first-call allocations, lazy inits) on one file
        encode_files([work / "audio" / "clip0000.flac"], work / "warm", model, progress=False)
        results = []
        runs = [(m, bs, b) for m in (["model"] + (["null"] if args.null_model else [])) for bs in args.batch_sizes
                for b in (args.buckets if m == "model" else ["exact"])]
        null = NullModel(model.config)
        for which, bs, bucket in runs:
            for task in ("encode", "decode"):
                if task == "decode" and bucket != args.buckets[0] and which == "model":
                    continue  # the codes are the same: decode once per batch size
                src = work / "audio" if task == "encode" else work / f"codes_{which}_bs{bs}_{bucket}"
                dst = work / (f"codes_{which}_bs{bs}_{bucket}" if task == "encode" else f"dec_{which}_bs{bs}")
                kw = {"bucket": bucket} if task == "encode" else {}
                fn = encode_files if task == "encode" else decode_files
                rep = fn([src], dst, model if which == "model" else null, batch_size=bs, workers=args.workers,
                         progress=False, **kw)
                assert rep.ok, rep.summary()
                results.append({
                    "task": task + (f" ({bucket})" if task == "encode" else ""),
                    "model": args.preset if which == "model" else "null (pipeline only)", "batch_size": bs, "files": len(rep.done), "audio_seconds": round(rep.audio_seconds, 3),
                    "wall_seconds": round(rep.wall_seconds, 3), "model_seconds": round(rep.model_seconds, 3),
                    "files_per_second": round(rep.files_per_second, 3),
                    "audio_hours_per_hour": round(rep.speed, 3), "rtf": round(rep.realtime_factor, 4),
                })
        # codes of every bucket mode against the first one's, file by file (exact modes must agree fully)
        from dac_fast.dacfile import DacFile

        agreement = {}
        for bs in args.batch_sizes:
            ref_dir = work / f"codes_model_bs{bs}_{args.buckets[0]}"
            for bucket in args.buckets[1:]:
                same = total = 0
                for ref in sorted(ref_dir.rglob("*.dac")):
                    a = DacFile.load(ref).codes
                    b = DacFile.load(work / f"codes_model_bs{bs}_{bucket}" / ref.relative_to(ref_dir)).codes
                    same, total = same + int((a == b).sum()), total + a.size
                agreement[f"{bucket} vs {args.buckets[0]}, batch {bs}"] = round(same / max(total, 1), 6)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "device": args.device, "preset": args.preset, "allocator_tuned": tuned,
        "corpus": f"{args.files} files x {args.seconds} s {'(variable 0.5-1.5x)' if args.variable else '(equal length)'}"
                  f" at {args.source_rate} Hz, flac, speech-/music-like",
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "code_agreement": agreement,
    }
    print(f"\ncommand: {meta['command']}\ndate: {meta['date']}\nmachine: {meta['machine']}\n"
          f"model: {args.preset} ({meta['model_class']}, random weights), device {args.device}, "
          f"allocator tuned: {tuned}\ncorpus: {meta['corpus']}\n")
    for what, rate in agreement.items():
        print(f"codes equal, {what}: {rate:.6f}")
    print("| task | model | batch | files | audio s | wall s | model s | files/s | audio h per h | RTF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['model']} | {r['batch_size']} | {r['files']} | {r['audio_seconds']} | {r['wall_seconds']} | "
              f"{r['model_seconds']} | {r['files_per_second']} | {r['audio_hours_per_hour']} | {r['rtf']} |")
    out = {"meta": meta, "results": results}
    print("\n" + json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
