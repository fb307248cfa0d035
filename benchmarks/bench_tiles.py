"""Where dac_fast's model time goes: tile sizes, the CPU buffer cache, the pure-torch backend, in one process.

    python benchmarks/bench_tiles.py [--allocator tuned|default] [--seconds 5] [--json out.json]

44khz preset, batch 1, seeded random weights shared with transformers' DacModel (timed too, as the
reference); min of 2 timed calls after a warm-up; prints a markdown table. Set DAC_FAST_SNAKE_SIN=fast
in the environment to time the opt-in polynomial sine.
"""

import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
parser.add_argument("--seconds", type=float, default=5.0)
parser.add_argument("--json", default=None)
args = parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dac_fast.runtime import allocator_setting  # noqa: E402  (imports no torch)

ALLOCATOR = allocator_setting(args.allocator)  # before torch allocates anything

import torch  # noqa: E402

from dac_fast import ops  # noqa: E402
from tests.reference import model_pair  # noqa: E402


def best_of(fn, n=2):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


hf, ours = model_pair("44khz", seed=1)
frames = int(args.seconds * 44100 / 512)
x = torch.randn(1, 1, frames * 512, generator=torch.Generator().manual_seed(0)) * 0.3
rows = []
with torch.inference_mode():
    z = ours.encode(x).quantized_representation
    rows.append(("transformers eager", best_of(lambda: hf.encode(x)), best_of(lambda: hf.decode(z))))
    for tile in (96, 192, 384, 768, 10**9):
        name = "dac_fast untiled" if tile == 10**9 else f"dac_fast tiles of {tile} frames"
        rows.append((name, best_of(lambda: ours.encode(x, tile_frames=tile)),
                     best_of(lambda: ours.decode(z, tile_frames=tile))))
    os.environ["DAC_FAST_CPU_CACHE_MB"] = "0"  # read at every call
    for tile in (192, 10**9):
        name = "untiled" if tile == 10**9 else f"tiles of {tile} frames"
        rows.append((f"dac_fast {name}, buffer cache off", best_of(lambda: ours.encode(x, tile_frames=tile)),
                     best_of(lambda: ours.decode(z, tile_frames=tile))))
    del os.environ["DAC_FAST_CPU_CACHE_MB"]
    with ops.backend("torch"):
        rows.append(("dac_fast untiled, pure-torch backend", best_of(lambda: ours.encode(x, tile_frames=10**9)),
                     best_of(lambda: ours.decode(z, tile_frames=10**9))))

sine = os.environ.get("DAC_FAST_SNAKE_SIN", "exact")
print(f"# 44khz, batch 1, {args.seconds:g} s, {torch.get_num_threads()} threads, {ALLOCATOR}, "
      f"snake sine {sine}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
print("| setting | encode s | decode s |\n|---|---:|---:|")
for name, enc, dec in rows:
    print(f"| {name} | {enc:.3f} | {dec:.3f} |")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"allocator": ALLOCATOR, "sine": sine, "rows": rows}, f, indent=2)
