"""Ray throughput: dac_fast.distributed.encode_dataset with 1 and 2 local encoder workers.

    .venv/bin/python benchmarks/bench_distributed.py [--preset 16khz] [--files 12] [--seconds 4]
        [--workers 1 2] [--threads-per-worker 1] [--batch-size 4] [--gpus-per-worker 0] [--json out.json]

Generates the same synthetic corpus as bench_files.py (speech-/music-like flac clips at 22050 Hz,
so resampling is included), starts a local Ray with all CPUs, and times encode_dataset end to
end (Ray Data startup, actor start + model load, read/resample/loudness tasks, encode, Parquet
shards) per worker count, into a fresh output directory each time. Also measured, in this
process on one thread: the per-input CPU cost of reading (flac decode) + resampling + loudness,
reported per audio hour (the cost the read tasks must cover for N GPUs), and the single-machine
encode_files on the same files as a reference. Model weights are seeded random (timings do not
depend on weight values). Prints a markdown table and JSON.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def prep_cost(files, model_rate: int, hop: int) -> float:
    """Seconds of one CPU thread per second of audio for read + resample + loudness."""
    import soundfile as sf
    import torch

    from dac_fast.distributed.stages import Reader

    torch.set_num_threads(1)
    reader = Reader(model_rate, hop, -16.0)
    audio_s, t = 0.0, time.perf_counter()
    for f in files:
        out = reader({"path": str(f)})
        assert not out["error"], out["error"]
        audio_s += sf.info(str(f)).duration
    return (time.perf_counter() - t) / audio_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="16khz")
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--source-rate", type=int, default=22050)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--cpus-per-worker", type=float, default=None)
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-single", action="store_true", help="skip the single-machine encode_files reference")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray
    import torch

    from bench_files import make_corpus
    from dac_fast.batch import encode_files, load_model, model_rate_and_hop
    from dac_fast.runtime import tune_allocator
    from dac_fast.distributed import encode_dataset, worker_runtime_env

    tune_allocator()
    work = Path(tempfile.mkdtemp(prefix="dacfast-bench-ray-"))
    rows = []
    try:
        audio_s = make_corpus(work / "audio", args.files, args.seconds, args.source_rate, False)
        files = sorted((work / "audio").glob("*.flac"))
        model = load_model(args.preset, "cpu", quiet=True)
        sr, hop = model_rate_and_hop(model)
        prep = prep_cost(files, sr, hop)
        rows.append({"run": "read+resample+loudness (1 thread, in process)", "wall_s": prep * audio_s,
                     "x_realtime": 1 / prep, "cpu_s_per_audio_h": prep * 3600})
        if not args.no_single:
            torch.set_num_threads(os.cpu_count() or 1)
            encode_files([files[0]], work / "warm", model, progress=False)
            t = time.perf_counter()
            rep = encode_files(files, work / "single", model, batch_size=args.batch_size, workers=2, progress=False)
            wall = time.perf_counter() - t
            rows.append({"run": f"encode_files, single process, {torch.get_num_threads()} threads", "wall_s": wall,
                         "x_realtime": rep.audio_seconds / wall, "files_per_s": len(rep.done) / wall,
                         "model_s": rep.model_seconds})
        del model
        ray.init(include_dashboard=False, runtime_env=worker_runtime_env(), log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cpus = int(ray.cluster_resources().get("CPU", 0))
        # fixed cost of one job (Ray Data planning, actor start, model build, first batch): one file
        t = time.perf_counter()
        rep = encode_dataset([str(files[0])], work / "ray_one", args.preset, batch_size=1, concurrency=1,
                             num_gpus_per_worker=args.gpus_per_worker, num_cpus_per_worker=args.cpus_per_worker,
                             threads_per_worker=args.threads_per_worker, progress=False)
        overhead = time.perf_counter() - t - rep.model_seconds
        rows.append({"run": "ray job fixed overhead (1 file, wall minus model time)", "wall_s": overhead,
                     "x_realtime": float("nan")})
        for n in args.workers:
            out = work / f"ray{n}"
            t = time.perf_counter()
            rep = encode_dataset([str(work / "audio")], out, args.preset, batch_size=args.batch_size, concurrency=n,
                                 num_gpus_per_worker=args.gpus_per_worker, num_cpus_per_worker=args.cpus_per_worker,
                                 threads_per_worker=args.threads_per_worker, progress=False)
            wall = time.perf_counter() - t
            assert rep.ok and len(rep.done) == len(files), rep.summary()
            rows.append({"run": f"ray encode_dataset, {n} worker(s) x {args.threads_per_worker} thread(s)",
                         "wall_s": wall, "x_realtime": rep.audio_seconds / wall, "files_per_s": len(rep.done) / wall,
                         "model_s": rep.model_seconds,
                         "model_x_realtime_per_worker": rep.audio_seconds / max(rep.model_seconds, 1e-9),
                         "steady_x_realtime": rep.audio_seconds / max(wall - overhead, 1e-9)})
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load avg {os.getloadavg()[0]:.1f}",
        "ray": ray.__version__, "torch": torch.__version__, "preset": args.preset, "ray_cpus": cpus,
        "corpus": f"{args.files} x {args.seconds:g} s flac at {args.source_rate} Hz ({audio_s:.0f} s audio)",
        "batch_size": args.batch_size,
        "command": "benchmarks/bench_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(meta))
    print("| run | wall s | x real time | files/s | model s (sum) | x real time without fixed overhead |")
    print("|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.2f} | {r['x_realtime']:.2f} | {r.get('files_per_s', nan):.2f} "
              f"| {r.get('model_s', nan):.2f} | {r.get('steady_x_realtime', nan):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
