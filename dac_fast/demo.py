"""``python -m dac_fast.demo [--out DIR]``: try the file pipeline on generated audio.

Writes a few short speech-like clips (glottal pulse trains through formant resonators, a
gliding chirp) and music-like clips (a chord with harmonics, a drum-like noise burst) at
different sample rates and channel counts, encodes them with :func:`dac_fast.encode_files`,
decodes them with :func:`dac_fast.decode_files`, and prints throughput.

The default model is the ``44khz`` preset with seeded RANDOM weights (no checkpoint is
needed, and none is downloaded): the pipeline, shapes and timings are real, the decoded audio
is not. Pass ``--model`` with a checkpoint directory / .pth / hub id for meaningful output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _resonate(x, sr, freq, bw):
    """Two-pole resonator (a formant) at ``freq`` Hz with bandwidth ``bw`` Hz."""
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bw / sr)
    theta = 2 * np.pi * freq / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, x)


def speech_like(sr, seconds, seed=0, vowels=("a", "i", "u")):
    rng = np.random.default_rng(seed)
    formants = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240), "e": (530, 1840, 2480)}
    n = int(sr * seconds)
    t = np.arange(n) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t) + 8 * np.sin(2 * np.pi * 5.5 * t)  # intonation + vibrato
    phase = np.cumsum(f0 / sr)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)  # glottal pulse train
    pulses += 0.02 * rng.standard_normal(n)  # breath noise
    out = np.zeros(n)
    seg = n // len(vowels)
    for i, v in enumerate(vowels):
        s = slice(i * seg, n if i == len(vowels) - 1 else (i + 1) * seg)
        y = sum(_resonate(pulses[s], sr, f, 60 + 20 * k) * (0.6 ** k) for k, f in enumerate(formants[v]))
        env = np.hanning(y.size) ** 0.3
        out[s] = y * env
    return 0.5 * out / (np.abs(out).max() + 1e-9)


def chirp(sr, seconds):
    t = np.arange(int(sr * seconds)) / sr
    f = 150 * (1 + 8 * t / seconds)
    return 0.4 * np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(t.size) ** 0.2


def chord(sr, seconds, root=220.0, seed=0):
    t = np.arange(int(sr * seconds)) / sr
    out = np.zeros_like(t)
    for ratio in (1.0, 5 / 4, 3 / 2, 2.0):  # major chord + octave
        for h in range(1, 6):  # harmonics
            out += (0.5 ** h) * np.sin(2 * np.pi * root * ratio * h * t + seed * h)
    env = np.minimum(1.0, t / 0.02) * np.exp(-1.2 * t)
    return 0.3 * out * env / 2.0


def drum(sr, seconds, seed=0, period=0.5):
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    out = np.zeros(n)
    for start in np.arange(0, seconds, period):
        i = int(start * sr)
        m = min(n - i, int(0.3 * sr))
        tt = np.arange(m) / sr
        hit = 0.6 * rng.standard_normal(m) * np.exp(-tt * 25) + 0.8 * np.sin(2 * np.pi * 60 * tt * (1 - tt)) * np.exp(-tt * 12)
        out[i:i + m] += hit
    return 0.5 * out / (np.abs(out).max() + 1e-9)


def make_clips(directory) -> list[Path]:
    """Write the demo clips; returns their paths."""
    import soundfile as sf

    d = Path(directory)
    (d / "speech").mkdir(parents=True, exist_ok=True)
    (d / "music").mkdir(parents=True, exist_ok=True)
    clips = {
        "speech/vowels_16k.wav": (16000, [speech_like(16000, 1.5, 0)]),
        "speech/vowels_24k.flac": (24000, [speech_like(24000, 1.2, 1, ("e", "a", "i"))]),
        "speech/chirp_44k.wav": (44100, [chirp(44100, 1.0)]),
        "music/chord_44k_stereo.flac": (44100, [chord(44100, 1.5), chord(44100, 1.5, seed=1) * 0.8]),
        "music/drums_48k.wav": (48000, [drum(48000, 1.0)]),
        "music/mix_22k_stereo.ogg": (22050, [chord(22050, 1.2, 330) + 0.5 * drum(22050, 1.2, 3, 0.4),
                                             chord(22050, 1.2, 330, 2) + 0.5 * drum(22050, 1.2, 4, 0.4)]),
    }
    paths = []
    for name, (sr, chans) in clips.items():
        x = np.stack(chans, axis=1).astype(np.float32)
        p = d / name
        sf.write(p, x, sr)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dac_fast.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="working folder (default: a new temporary folder)")
    ap.add_argument("--model", default="44khz", help="model spec (default: 44khz preset, RANDOM weights)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    from .batch import decode_files, encode_files, load_model
    from .runtime import tune_allocator

    tune_allocator()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dac_fast_demo_"))
    audio_dir, codes_dir, dec_dir = out / "audio", out / "codes", out / "decoded"
    paths = make_clips(audio_dir)
    print(f"wrote {len(paths)} clips (speech-like and music-like, 16-48 kHz, mono and stereo) to {audio_dir}")
    if args.model in ("16khz", "24khz", "44khz", "44khz_16kbps"):
        print(f"NOTE: model {args.model!r} is a preset with RANDOM weights: the pipeline and timings are real, "
              "the decoded audio is noise-like. Use --model with a real checkpoint for meaningful output.")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    model = load_model(args.model, device, quiet=True)
    print(f"model loaded in {time.perf_counter() - t:.1f} s on {device}")

    rows = []
    for task, fn, src, dst in (("encode", encode_files, audio_dir, codes_dir), ("decode", decode_files, codes_dir, dec_dir)):
        rep = fn([src], dst, model, batch_size=args.batch_size, workers=args.workers, overwrite=True,
                 device=None, progress=False)
        print(rep.summary())
        if not rep.ok:
            return 1
        rows.append((task, rep))
    print("\n| task | files | audio s | wall s | files/s | audio s per s | RTF |")
    print("|---|---|---|---|---|---|---|")
    for task, r in rows:
        print(f"| {task} | {len(r.done)} | {r.audio_seconds:.2f} | {r.wall_seconds:.2f} | {r.files_per_second:.2f} | "
              f"{r.speed:.2f} | {r.realtime_factor:.3f} |")
    print(f"\noutputs: {codes_dir} (.dac), {dec_dir} (decoded audio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
