"""Measured agreement of the shape-dependent paths with the offline call, for the device check's summary.

    python scripts/cuda_agreement.py [--device cuda|cpu] [--markdown FILE] [--json FILE]

On CUDA, cuDNN may pick other convolution algorithms for other shapes, so a stream (windows of other widths),
a padded batch (other batch and length) or a CUDA graph need not give the offline call's bits although the
implementation is right: those are measurements (codes equal %, max abs difference of the audio), reported
in a table, not pass/fail tests. What stays a failure (``verdict``): a wrong shape, NaN or Inf, codes agreeing
on less than 99.9%, decoded audio further than 1e-3 from the offline call's. Rows: streaming decode and
encode against offline, a padded batch against each item alone, and (CUDA only) cuda_graphs=True against
eager for a tiled encode and decode and for the streaming decoder. On the CPU (the rehearsal) every row's codes
must be exact (decoded audio may differ at rounding level: the streaming decoder's packed weights). The markdown and JSON are rewritten after each row, so a run cut by its cap keeps what it measured.
Exit status 1 when any row fails its verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIN_CODE_AGREEMENT = 0.999
MAX_AUDIO_DIFFERENCE = 1e-3  # decoded audio lies in [-1, 1] (tanh)


def measure(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Agreement of ``actual`` with ``expected``: shapes, whether it is finite, and for integer codes the
    fraction equal, else the max abs difference."""
    row = {"shape": list(actual.shape), "expected_shape": list(expected.shape),
           "finite": bool(torch.isfinite(actual.float()).all())}
    if actual.shape != expected.shape:
        return row
    if actual.is_floating_point():
        row["max_abs_diff"] = (actual.double() - expected.double()).abs().max().item()
    else:
        row["codes_equal"] = (actual == expected).double().mean().item()
    return row


def verdict(row: dict) -> str | None:
    """None when ``row`` (``measure``'s) is within what a correct implementation gives, else the problem."""
    if row["shape"] != row["expected_shape"]:
        return f"shape {tuple(row['shape'])} != {tuple(row['expected_shape'])}"
    if not row["finite"]:
        return "NaN or Inf in the output"
    if row.get("codes_equal", 1.0) < MIN_CODE_AGREEMENT:
        return f"codes agree on {100 * row['codes_equal']:.3f}% (< {100 * MIN_CODE_AGREEMENT:g}%)"
    if row.get("max_abs_diff", 0.0) > MAX_AUDIO_DIFFERENCE:
        return f"audio differs by {row['max_abs_diff']:.3g} (> {MAX_AUDIO_DIFFERENCE:g})"
    return None


def _clip(n_samples: int, sampling_rate: int, seed: int) -> np.ndarray:
    """Non-trivial audio (a chord and drum bursts; numpy only, as on the device) of ``n_samples``."""
    from dac_fast.demo import chord, drum

    secs = n_samples / sampling_rate + 0.01
    x = 0.5 * chord(sampling_rate, secs, root=110 + 20 * seed, seed=seed) + 0.3 * drum(sampling_rate, secs, seed=seed)
    x = np.asarray(x, dtype=np.float64)[:n_samples]
    return (0.8 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def _pushes(stream, inputs: torch.Tensor, sizes) -> torch.Tensor:
    """``stream``'s pushes of ``inputs`` cut at ``sizes`` along time, then its flush, concatenated."""
    outs, start = [], 0
    for size in sizes:
        outs.append(stream.push(inputs[..., start : start + size]))
        start += size
    outs.append(stream.flush())
    return torch.cat(outs, dim=-1)


def cases(model, device: str):
    """(name, run) pairs; run() -> (actual, expected)."""
    config = model.config
    hop = config.hop_length
    gen = torch.Generator().manual_seed(13)
    codes = torch.randint(0, config.codebook_size, (2, config.n_codebooks, 23), generator=gen).to(device)
    sr = config.sampling_rate

    def audio(lengths, seed):  # (len(lengths), 1, samples): each clip at its length, right-padded with zeros
        out = np.zeros((len(lengths), 1, max(lengths)), dtype=np.float32)
        for i, n in enumerate(lengths):
            out[i, 0, :n] = _clip(n, sr, seed + i)
        return torch.from_numpy(out).to(device)

    clips = audio([9 * hop + 71] * 2, 1)
    long_audio = audio([int(2.3 * sr)] * 2, 20)
    item_lengths = [int(s * sr) + 3 * i + 1 for i, s in enumerate((0.23, 0.11, 0.17))]

    def stream_decode():
        return (_pushes(model.streaming_decoder(batch_size=2), codes, [1, 4, 16, 2]),
                model.decode(audio_codes=codes).audio_values)

    def stream_encode():
        return (_pushes(model.streaming_encoder(batch_size=2), clips, [hop + 1, 5, 4 * hop, 4 * hop + 65]),
                model.encode(clips).audio_codes)

    def padded_batch():
        batch = audio(item_lengths, 10)
        mask = (torch.arange(batch.shape[-1], device=device) < torch.tensor(item_lengths, device=device)[:, None]).long()
        out = model.encode(batch, padding_mask=mask)
        frames = out.audio_frames.tolist()
        # alone = as the feature extractor gives one clip: zero-padded to whole hops (encode(padding_mask=)'s contract)
        alone = [model.encode(torch.nn.functional.pad(batch[b : b + 1, :, :n], (0, -n % hop))).audio_codes[0]
                 for b, n in enumerate(item_lengths)]
        return torch.cat([out.audio_codes[b, :, : frames[b]] for b in range(len(frames))], -1), torch.cat(alone, -1)

    def graphs_encode():
        eager = model.encode(long_audio, tile_frames=48).audio_codes
        model.encode(long_audio, tile_frames=48, cuda_graphs=True)  # capture
        return model.encode(long_audio, tile_frames=48, cuda_graphs=True).audio_codes, eager  # replay

    def graphs_decode():
        eager = model.decode(audio_codes=codes, tile_frames=8).audio_values
        model.decode(audio_codes=codes, tile_frames=8, cuda_graphs=True)
        return model.decode(audio_codes=codes, tile_frames=8, cuda_graphs=True).audio_values, eager

    def graphs_stream():
        sizes = [5] + [4] * 4 + [2]
        return (_pushes(model.streaming_decoder(batch_size=2, cuda_graphs=True), codes, sizes),
                _pushes(model.streaming_decoder(batch_size=2), codes, sizes))

    rows = [("stream decode vs offline", stream_decode), ("stream encode codes vs offline", stream_encode),
            ("padded batch codes vs each item alone", padded_batch)]
    if device == "cuda":
        rows += [("cuda_graphs encode (tiled) vs eager", graphs_encode),
                 ("cuda_graphs decode (tiled) vs eager", graphs_decode),
                 ("cuda_graphs streaming decoder vs eager stream", graphs_stream)]
    return rows


def markdown(rows: list) -> str:
    lines = ["| comparison | codes equal % | max abs diff | shape | s | verdict |", "|---|---:|---:|---|---:|---|"]
    for r in rows:
        codes = f"{100 * r['codes_equal']:.3f}" if "codes_equal" in r else ""
        diff = f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else ""
        lines.append(f"| {r['name']} | {codes} | {diff} | {tuple(r.get('shape', ()))} | {r['seconds']:.1f} | "
                     f"{r['verdict']} |")
    return "\n".join(lines) + "\n"


def _write(path, text):
    if path:
        part = Path(f"{path}.part")
        part.write_text(text)
        part.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="16khz")
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from dac_fast import DacModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = DacModel.from_preset(args.preset, seed=5, device=args.device)
    rows = []
    for name, run in cases(model, args.device):
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                row = measure(*run())
            problem = verdict(row)
            if args.device == "cpu" and problem is None and row.get("codes_equal", 1.0) < 1.0:
                problem = "the CPU path must give the offline codes exactly"
        except Exception as exc:  # noqa: BLE001 - a crash is this row's failure; the other rows still run
            row, problem = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row.update(name=name, seconds=time.perf_counter() - start, verdict="ok" if problem is None else f"FAIL: {problem}")
        rows.append(row)
        print(f"{name:48s} {row['verdict']}  {json.dumps({k: v for k, v in row.items() if k in ('codes_equal', 'max_abs_diff')})}",
              flush=True)
        _write(args.markdown, f"# agreement ({args.device}, {args.preset}, fp32, TF32 off)\n\n" + markdown(rows))
        _write(args.json, json.dumps(rows, indent=1))
    failed = [r["name"] for r in rows if r["verdict"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} comparisons within bounds" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
