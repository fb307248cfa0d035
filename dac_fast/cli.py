"""``dac-fast``: encode audio files to DAC codes, decode them back, inspect .dac files, check the install.

Run as ``dac-fast ...`` or ``python -m dac_fast.cli ...``. ``main(argv)`` returns the exit
status: 0 when every input succeeded, 1 when any input failed or nothing was found to work on
(the failures are listed), 2 for usage errors (bad arguments, unusable output directory, unknown
model, unusable device; never a traceback), 130 when interrupted.

torch is imported only by the commands that need it, so ``--help`` and ``--version`` are quick.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap

from .configuration import PRESETS
from .runtime import tune_allocator

PRESET_NAMES = tuple(PRESETS)

ENCODE_EXAMPLES = textwrap.dedent(
    """\
    examples:
      dac-fast encode corpus/ -o codes/ --model /ckpt/dac_44khz        # a whole tree, recursively
      dac-fast encode 'clips/*.flac' -o codes/ --model weights_16khz.pth --batch-size 32
      dac-fast encode corpus/ -o tokens/ --model descript/dac_24khz --format npy --n-quantizers 4
      dac-fast encode demo/ -o out/ --model 44khz --random-weights     # RANDOM weights: try-out only
      dac-fast encode /shared/corpus -o /shared/codes --model /ckpt/dac_44khz --ray   # Ray cluster (pip install .[ray])

    --model accepts a local directory (transformers layout), an original .pth checkpoint or a
    hub id. The preset names (16khz, 24khz, 44khz, 44khz_16kbps) build the real architecture with
    seeded RANDOM weights, for trying the pipeline out: they need --random-weights.

    Re-running a command skips inputs whose outputs are complete and were made by the same model
    and settings from the same source (a record is kept in OUTDIR/.dac-fast-outputs.jsonl);
    damaged outputs and changed sources are redone; outputs made with another model or settings
    stop the run (use another OUTDIR, or --overwrite). A file at an output path that dac-fast did
    not write is never replaced without --overwrite (that input fails). Globs and file lists mirror
    the tree below their common folder, as directories do. Outputs are written atomically; bad
    inputs are reported and skipped; the exit status is 1 when any input failed.
    """
)

DECODE_EXAMPLES = textwrap.dedent(
    """\
    examples:
      dac-fast decode codes/ -o restored/ --model /ckpt/dac_44khz
      dac-fast decode codes/song.dac -o restored/ --model descript/dac_44khz --format flac --subtype pcm24

    Decode with the model that encoded the files: files whose frame rate or codebook count does
    not fit the model are refused (listed as failed). Re-running skips complete outputs (as encode).
    """
)


def _version() -> str:
    from . import __version__

    return __version__


def _add_run_arguments(p: argparse.ArgumentParser, task: str):
    """The arguments encode and decode share, with help worded for ``task``."""
    encoding = task == "encode"
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=("audio files" if encoding else ".dac files (or npy-format .json files)")
                   + ", directories (searched recursively) or quoted glob patterns")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR",
                   help="output directory (the input tree is mirrored under it)")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="local model directory, original .pth checkpoint or hub id"
                   + ("" if encoding else " (the model that encoded the files)")
                   + "; a preset name (" + "|".join(PRESET_NAMES) + ") with --random-weights")
    p.add_argument("--random-weights", action="store_true",
                   help="allow a preset --model: the real architecture with seeded RANDOM weights, "
                        "for trying the pipeline out (outputs are meaningless)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --random-weights model (default: 0)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model precision (default: float32; float16/bfloat16 change "
                        + ("codes" if encoding else "audio") + " slightly)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="rows per model call; a stereo file is 2 rows (default: %(default)s)")
    p.add_argument("--n-quantizers", type=int, default=None, metavar="N",
                   help=("encode with only the first N codebooks" if encoding
                         else "decode from only the first N codebooks of each file") + " (default: all)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help=("background threads reading and resampling audio" if encoding
                         else "background threads resampling and writing audio") + " (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every input, even those whose outputs are complete, and replace files at output "
                        "paths that dac-fast did not write")
    p.add_argument("--tile-frames", type=int, default=None, metavar="N",
                   help="frames per model tile for long files (default: the model's); results do not depend on it")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for the model (default: torch's choice)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    from .batch import BUCKETS, FORMATS, SUBTYPES  # the choices the API accepts (no torch import)

    parser = argparse.ArgumentParser(
        prog="dac-fast",
        description="Fast Descript Audio Codec: encode audio files to discrete codes (.dac files, "
                    "compatible with the original package) and decode them back.",
        epilog=ENCODE_EXAMPLES + "\n" + DECODE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dac-fast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    enc = sub.add_parser(
        "encode", help="audio files -> .dac codes",
        description="Encode audio (wav, flac, ogg, ... anything libsndfile reads) to DAC codes. "
                    "Audio is resampled to the model rate (soxr), loudness-normalized to -16 LUFS as "
                    "the original compress does (the input loudness is stored), channels are encoded "
                    "separately. Codes equal whole-file codes (long files are tiled exactly by the model).",
        epilog=ENCODE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(enc, "encode")
    enc.add_argument("--format", default="dac", choices=FORMATS,
                     help="dac: the original package's .dac files (default); npy: NAME.codes.npy + NAME.json")
    enc.add_argument("--bucket", default="exact", choices=BUCKETS,
                     help="exact: batch only equal-length items, codes identical to one-file-at-a-time "
                          "(default); mask: batch neighbours of any length with a padding mask, codes "
                          "also identical to one-file-at-a-time; pad: batch neighbours padded to the "
                          "longest without a mask, the last few frames of shorter items may differ")
    from .distributed import add_ray_arguments  # ray itself is imported only when --ray is used

    add_ray_arguments(enc)

    dec = sub.add_parser(
        "decode", help=".dac codes -> audio files",
        description="Decode .dac files (or npy-format .json files) to audio with the original sample "
                    "rate, length, channel count and loudness.",
        epilog=DECODE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(dec, "decode")
    dec.add_argument("--format", default="wav", choices=["wav", "flac", "ogg"],
                     help="audio file format (default: %(default)s)")
    dec.add_argument("--subtype", default="pcm16", choices=list(SUBTYPES),
                     help="samples of wav/flac outputs: 16-bit (default, as the original), 24-bit, or "
                          "32-bit float (wav only). The .dac file does not record the input's sample format")

    inf = sub.add_parser("info", help="show what .dac files hold",
                         description="Print the metadata of .dac / npy-format files, or of every such file in "
                                     "directories (read safely: no pickle code runs). sample_rate is the "
                                     "encoded audio's rate; the model's rate, frame rate and bitrate are "
                                     "inferred from frames and duration where the file does not store them.")
    inf.add_argument("files", nargs="+", metavar="PATH", help=".dac / .json files or directories")
    inf.add_argument("--json", action="store_true", help="print one JSON object per file")

    doc = sub.add_parser("doctor", help="show what this installation has: versions, kernels, devices",
                         description="Report package and torch versions, which compiled kernels are active on "
                                     "CPU and CUDA (and why not), the CUDA device, the allocator setting and "
                                     "the extension's build flags.")
    doc.add_argument("--json", action="store_true", help="print JSON")
    from .serving.command import add_serve_parser

    add_serve_parser(sub)
    return parser


class _Stop(Exception):
    """A usage error found by the CLI itself: message, exit status 2."""


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "serve":
            from .serving.command import run_serve

            return run_serve(args)
        return _run(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _run(args) -> int:
    prev = None
    try:
        prev = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        from .arguments import UserError

        try:
            return _run_files(args)
        except UserError as exc:
            print(f"dac-fast {args.command}: {exc.for_cli()}", file=sys.stderr)
            return 2
        except _Stop as exc:
            print(f"dac-fast {args.command}: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("dac-fast: interrupted; finished outputs are complete, no partial files were left. "
              "Re-run the same command to continue.", file=sys.stderr)
        return 130
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _run_files(args) -> int:
    from .arguments import check_device, check_n_quantizers, check_positive
    from .batch import decode_files, encode_files

    if args.model in PRESET_NAMES and not args.random_weights:
        raise _Stop(f"--model {args.model}: a preset has RANDOM weights (codes and audio are meaningless); "
                    "pass --random-weights to try the pipeline with it, or give a checkpoint directory, "
                    ".pth file or hub id")
    check_positive(batch_size=args.batch_size, workers=args.workers)
    check_n_quantizers(args.n_quantizers)
    if args.tile_frames is not None and args.tile_frames < 1:
        raise _Stop(f"--tile-frames: must be >= 1, got {args.tile_frames}")
    if args.threads is not None and args.threads < 1:
        raise _Stop(f"--threads: must be >= 1, got {args.threads}")
    if args.command == "encode" and getattr(args, "ray", None) is not None:
        from .distributed import run_from_cli

        return run_from_cli(args)
    device = check_device(args.device)
    if args.random_weights and args.model in PRESET_NAMES:
        print(f"dac-fast: model {args.model!r} has RANDOM weights (seed {args.seed}): try-out only, the "
              "outputs are meaningless. Pass --model with a checkpoint for real use.", file=sys.stderr)
    import warnings

    import torch

    tune_allocator()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kw = dict(batch_size=args.batch_size, n_quantizers=args.n_quantizers, workers=args.workers,
              overwrite=args.overwrite, format=args.format, progress=args.progress, tile_frames=args.tile_frames,
              device=str(device) if device is not None else None, dtype=args.dtype, seed=args.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")  # said above, in CLI words
        if args.command == "encode":
            report = encode_files(args.inputs, args.output_dir, args.model, bucket=args.bucket, **kw)
        else:
            report = decode_files(args.inputs, args.output_dir, args.model, subtype=args.subtype, **kw)
    print(report.summary(), file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0 if report.ok else 1


def _info(args) -> int:
    from .batch import info
    from .planning import CODE_EXTENSIONS, expand_inputs

    files, failures = expand_inputs(args.files, CODE_EXTENSIONS)
    status = 1 if failures else 0
    for f in failures:
        print(f"dac-fast info: {f}", file=sys.stderr)
    for path, _ in files:
        try:
            d = info(path)
        except Exception as exc:
            print(f"{path}: {exc}" if str(path) not in str(exc) else str(exc), file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps(d))
            continue
        print(f"{d.pop('path')}:")
        for k, v in d.items():
            print(f"  {k:20s} {v}" + ("  (of the encoded audio, not the model's)" if k == "sample_rate" else ""))
    return status


def _doctor(args) -> int:
    from .doctor import report

    d = report()
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        for k, v in d.items():
            print(f"{k:22s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
