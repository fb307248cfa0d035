"""The decoder's arithmetic and weight traffic per preset, and a paper estimate of streams held on one GPU.

    python benchmarks/flops.py [--presets 16khz 24khz 44khz] [--tflops 67] [--tb-per-s 4.8] [--push 4]
                               [--slots 64 256]

Counted from the config (``DacConfig`` of each preset): every convolution's ``in * out * kernel * 2`` FLOPs per
output sample (a transposed convolution of stride s: per INPUT sample, each input feeding ``kernel`` outputs),
at the sample rate of its output; Snake, the residual adds and ``tanh`` are left out (elementwise, a few
FLOPs per activation). The decoder's weight count from the same layer list is checked against the model's
parameters. A streaming push computes each new output once (the kept contexts are inputs, not recomputed), so
the slot decoder costs about the offline FLOPs per second of audio; Orpheus-style windows decode each frame
four times (28-frame windows per 7 new frames).

The estimate (a roofline, no measurement): a tick of S slots each pushing ``--push`` frames takes at least
max(S * FLOPs of a push / peak FLOP/s, decoder weight bytes / memory bandwidth); S streams are held in real time
while that is under the push period. Defaults: NVIDIA H200 SXM datasheet, 67 TFLOP/s dense fp32 (no TF32:
exact fp32 codes) and 4.8 TB/s HBM3e. Real kernels reach a fraction of peak; read the numbers as ceilings.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dac_fast import DacConfig, DacModel  # noqa: E402

WINDOW_COST = 28 / 7  # Orpheus-style windows: frames decoded per frame emitted


def decoder_convs(config: DacConfig) -> list[dict]:
    """Every convolution of the decoder (and the quantizer's code -> latent projections): name, in and out
    channels, kernel, whether transposed (stride), and the sample rate (per second) of its INPUT."""
    rate = config.sampling_rate / config.hop_length
    width = config.decoder_hidden_size
    convs = [{"name": "quantizer.out_proj", "c_in": config.codebook_dim * config.n_codebooks,
              "c_out": config.hidden_size, "kernel": 1, "stride": 1, "rate": rate},
             {"name": "conv1", "c_in": config.hidden_size, "c_out": width, "kernel": 7, "stride": 1, "rate": rate}]
    for i, stride in enumerate(config.upsampling_ratios):
        c_in, c_out = width // 2**i, width // 2 ** (i + 1)
        convs.append({"name": f"block.{i}.conv_t1", "c_in": c_in, "c_out": c_out, "kernel": 2 * stride,
                      "stride": stride, "rate": rate})
        rate *= stride
        for unit in (1, 2, 3):
            convs += [{"name": f"block.{i}.res_unit{unit}.conv{j}", "c_in": c_out, "c_out": c_out, "kernel": k,
                       "stride": 1, "rate": rate} for j, k in ((1, 7), (2, 1))]
    convs.append({"name": "conv2", "c_in": width // 2 ** len(config.upsampling_ratios), "c_out": 1, "kernel": 7,
                  "stride": 1, "rate": rate})
    return convs


def flops_per_second(convs: list[dict]) -> float:
    """Multiply-adds x 2 per second of audio: per input sample for a transposed conv, else per output sample
    (equal rates for stride 1)."""
    return sum(2 * c["c_in"] * c["c_out"] * c["kernel"] * c["rate"] for c in convs)


def weight_count(convs: list[dict]) -> int:
    return sum(c["c_in"] * c["c_out"] * c["kernel"] for c in convs)


def model_weight_count(model: DacModel) -> int:
    """The same weights counted from the model: the decoder's and the quantizers' out_proj conv weights."""
    return sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(".weight") and p.dim() == 3 and (n.startswith("decoder.") or ".out_proj." in n))


def estimate(preset: str, tflops: float, tb_per_s: float, push: int, slot_counts: list[int]) -> dict:
    model = DacModel.from_preset(preset, seed=0)
    config = model.config
    convs = decoder_convs(config)
    flops = flops_per_second(convs)
    weights = weight_count(convs)
    frame_rate = config.sampling_rate / config.hop_length
    period = push / frame_rate
    weight_read = 4 * weights / (tb_per_s * 1e12)  # fp32
    row = {"preset": preset, "gflop_per_audio_s": flops / 1e9, "decoder_weights_m": weights / 1e6,
           "model_weights_m": model_weight_count(model) / 1e6, "weight_read_us": 1e6 * weight_read,
           "push_period_ms": 1000 * period, "compute_bound_streams": tflops * 1e12 / flops,
           "windows_compute_bound_streams": tflops * 1e12 / (WINDOW_COST * flops)}
    for slots in slot_counts:
        compute = slots * flops * period / (tflops * 1e12)
        tick = max(compute, weight_read)
        row[f"slots{slots}_tick_ms"] = 1000 * tick
        row[f"slots{slots}_needs_peak_fraction"] = compute / period  # the efficiency at which S slots still keep up
        row[f"slots{slots}_streams"] = slots if tick <= period else int(slots * period / tick)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["16khz", "24khz", "44khz"])
    parser.add_argument("--tflops", type=float, default=67.0, help="peak dense fp32 TFLOP/s (H200 SXM: 67)")
    parser.add_argument("--tb-per-s", type=float, default=4.8, help="memory bandwidth, TB/s (H200: 4.8)")
    parser.add_argument("--push", type=int, default=4, help="frames per push")
    parser.add_argument("--slots", nargs="+", type=int, default=[64, 256])
    args = parser.parse_args()
    rows = [estimate(p, args.tflops, args.tb_per_s, args.push, args.slots) for p in args.presets]
    for row in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    print(f"\n{args.tflops:g} TFLOP/s fp32, {args.tb_per_s:g} TB/s, {args.push}-frame pushes\n")
    print("| preset | GFLOP / audio s | decoder weights (M) | weight read per tick | push period | compute-bound "
          "streams (slots / windows) | " + " | ".join(f"{s} slots: tick, share of peak needed" for s in args.slots)
          + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(args.slots))
    for r in rows:
        print(f"| {r['preset']} | {r['gflop_per_audio_s']:.1f} | {r['decoder_weights_m']:.1f} | "
              f"{r['weight_read_us']:.0f} us | {r['push_period_ms']:.1f} ms | {r['compute_bound_streams']:.0f} / "
              f"{r['windows_compute_bound_streams']:.0f} | "
              + " | ".join(f"{r[f'slots{s}_tick_ms']:.1f} ms, {100 * r[f'slots{s}_needs_peak_fraction']:.0f}%"
                           for s in args.slots) + " |")


if __name__ == "__main__":
    main()
