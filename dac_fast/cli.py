"""``dac-fast``: encode audio files to DAC codes, decode them back, inspect .dac files.

Run as ``dac-fast ...`` or ``python -m dac_fast.cli ...``. ``main(argv)`` returns the exit
status: 0 when every input succeeded, 1 when any input failed (the failures are listed),
2 for usage errors, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap

from .runtime import tune_allocator

EXAMPLES = textwrap.dedent(
    """\
    examples:
      dac-fast encode corpus/ -o codes/ --model /ckpt/dac_44khz        # a whole tree, recursively
      dac-fast encode 'clips/*.flac' -o codes/ --model weights_16khz.pth --batch-size 32
      dac-fast encode corpus/ -o tokens/ --format npy --n-quantizers 4  # dataset-friendly output
      dac-fast decode codes/ -o restored/ --model /ckpt/dac_44khz
      dac-fast info codes/song.dac
      dac-fast encode demo/ -o out/ --model 44khz                       # RANDOM weights: try-out only
      dac-fast encode /shared/corpus -o /shared/codes --model /ckpt/dac_44khz --ray   # Ray cluster (pip install .[ray])

    --model accepts a local directory (transformers layout), an original .pth checkpoint,
    a hub id, or a preset name (16khz, 24khz, 44khz, 44khz_16kbps) which builds the real
    architecture with seeded RANDOM weights for trying the pipeline out.

    Re-running a command skips inputs whose outputs are complete (--overwrite redoes them).
    Outputs are written atomically; bad inputs are reported and skipped; the exit status is
    1 when any input failed.
    """
)


def _common(p: argparse.ArgumentParser, default_format: str, formats):
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, directories (searched recursively) or quoted glob patterns")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR",
                   help="output directory (input directory trees are mirrored under it)")
    p.add_argument("--model", default="44khz", metavar="SPEC",
                   help="local model directory, original .pth checkpoint, hub id, or preset name "
                        "16khz|24khz|44khz|44khz_16kbps (RANDOM weights, try-out only). Default: %(default)s")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model precision (default: float32; float16/bfloat16 change codes slightly)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="rows per model call; a stereo file is 2 rows (default: %(default)s)")
    p.add_argument("--n-quantizers", type=int, default=None, metavar="N",
                   help="use only the first N codebooks (default: all)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="background threads reading/resampling (encode) or writing (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--format", default=default_format, choices=formats,
                   help=f"output format (default: {default_format})")
    p.add_argument("--tile-frames", type=int, default=None, metavar="N",
                   help="frames per model tile for long files (default: the model's); codes do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed for preset (random) weights (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for the model (default: torch's choice)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dac-fast",
        description="Fast Descript Audio Codec: encode audio files to discrete codes (.dac files, "
                    "compatible with the original package) and decode them back.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"dac-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    enc = sub.add_parser(
        "encode", help="audio files -> .dac codes",
        description="Encode audio (wav, flac, ogg, ... anything libsndfile reads) to DAC codes. "
                    "Audio is resampled to the model rate (soxr), loudness-normalized to -16 LUFS as "
                    "the original compress does (the input loudness is stored), channels are encoded "
                    "separately. Codes equal whole-file codes (long files are tiled exactly by the model).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(enc, "dac", ["dac", "npy"])
    enc.add_argument("--bucket", default="exact", choices=["exact", "pad"],
                     help="exact: batch only equal-length items, codes identical to one-file-at-a-time "
                          "(default); pad: batch neighbours padded to the longest, faster on variable "
                          "lengths but the last few frames of shorter items may differ")
    from .distributed import add_ray_arguments  # ray itself is imported only when --ray is used

    add_ray_arguments(enc)

    dec = sub.add_parser(
        "decode", help=".dac codes -> audio files",
        description="Decode .dac files (or npy-format .json files) to audio with the original sample "
                    "rate, length, channel count and loudness.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(dec, "wav", ["wav", "flac", "ogg"])

    inf = sub.add_parser("info", help="show what a .dac file holds",
                         description="Print the metadata of .dac / npy-format files (read safely: no pickle code runs).")
    inf.add_argument("files", nargs="+", metavar="FILE")
    inf.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _ModelLoadError(Exception):
    pass


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "info":
        from .batch import info

        status = 0
        for f in args.files:
            try:
                d = info(f)
            except Exception as exc:
                print(f"{f}: {exc}" if str(f) not in str(exc) else str(exc), file=sys.stderr)
                status = 1
                continue
            if args.json:
                print(json.dumps(d))
            else:
                print(f"{d['path']}:")
                for k, v in d.items():
                    if k != "path":
                        print(f"  {k:17s} {v}")
        return status

    tune_allocator()
    prev = None
    try:
        prev = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        from .batch import decode_files, encode_files, load_model

        if args.command == "encode" and getattr(args, "ray", None) is not None:
            from .distributed import run_from_cli

            return run_from_cli(args)
        for name in ("batch_size", "workers"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        device = args.device or _default_device()
        if args.threads is not None:
            import torch

            torch.set_num_threads(max(1, args.threads))
        def model():  # loaded lazily: a re-run with nothing left to do does not pay for it
            try:
                return load_model(args.model, device, args.dtype, seed=args.seed)
            except Exception as exc:
                raise _ModelLoadError(f"cannot load model {args.model!r}: {type(exc).__name__}: {exc}") from None

        kw = dict(batch_size=args.batch_size, n_quantizers=args.n_quantizers, workers=args.workers,
                  overwrite=args.overwrite, format=args.format, progress=args.progress, tile_frames=args.tile_frames)
        try:
            if args.command == "encode":
                report = encode_files(args.inputs, args.output_dir, model, bucket=args.bucket, **kw)
            else:
                report = decode_files(args.inputs, args.output_dir, model, **kw)
        except (ValueError, _ModelLoadError) as exc:
            print(f"dac-fast: {exc}", file=sys.stderr)
            return 2
        print(report.summary(), file=sys.stderr)
        if args.json:
            print(json.dumps(report.to_dict()))
        return 0 if report.ok else 1
    except KeyboardInterrupt:
        print("dac-fast: interrupted; finished outputs are complete, no partial files were left. "
              "Re-run the same command to continue.", file=sys.stderr)
        return 130
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


if __name__ == "__main__":
    sys.exit(main())
