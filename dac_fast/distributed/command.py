"""``dac-fast encode --ray``: the options (added to the CLI's parser, importing nothing heavy) and the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import DEFAULT_STALL_TIMEOUT
from .cluster import add_address_argument


def add_ray_arguments(parser) -> None:
    """Add ``--ray [ADDRESS]`` and the Ray options to the ``dac-fast encode`` parser."""
    g = parser.add_argument_group("distributed encoding on Ray (pip install .[ray])")
    add_address_argument(g, "encode with Ray Data", "Output: Parquet shards + manifest + errors table under "
                         "OUTDIR (--format dac also writes .dac files)")
    g.add_argument("--ray-workers", type=int, default=1, metavar="N", help="encoder actors (default: %(default)s)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per encoder actor (default: 1 if the cluster has GPUs, else 0 = CPU actors)")
    g.add_argument("--ray-cpus-per-worker", type=float, default=None, metavar="C",
                   help="CPUs reserved per encoder actor (default: 1 with GPUs, 0.5 without)")
    g.add_argument("--ray-stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                   help="stop the job when no block completes for this long; what remains is listed as lost "
                        "(default: %(default)g)")


def run_from_cli(args) -> int:
    """Run ``dac-fast encode --ray [ADDRESS] ...`` from parsed args; returns the exit status.

    Uses the Ray this process is already connected to, else ``ray.init(ADDRESS)`` (no ADDRESS:
    Ray's default lookup; 'auto': a running cluster; 'local': a new local Ray with all CPUs).
    ``--format dac`` writes .dac files next to the Parquet shards, ``--format npy`` only the
    shards. ``--overwrite`` is refused (use a new OUTDIR). Ctrl-C propagates as KeyboardInterrupt
    after manifest.parquet and errors.parquet are written.
    """
    from .cluster import connect, default_gpus
    from .driver import EncodeStopped, encode_dataset
    from .schema import ERRORS, MANIFEST, SHARDS_DIR

    if getattr(args, "overwrite", False):
        print("dac-fast: --overwrite is not supported with --ray (completed inputs are kept); "
              "use a new output directory", file=sys.stderr)
        return 2
    for name in ("batch_size", "ray_workers"):
        if getattr(args, name) < 1:
            print(f"dac-fast: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    stall_timeout = getattr(args, "ray_stall_timeout", DEFAULT_STALL_TIMEOUT)
    if not stall_timeout > 0:
        print(f"dac-fast: --ray-stall-timeout must be > 0 seconds, got {stall_timeout:g}", file=sys.stderr)
        return 2
    try:
        started = connect(args.ray or None, "the Ray engine (--ray)")
    except ConnectionError as exc:
        print(f"dac-fast: {exc}", file=sys.stderr)
        return 2
    try:
        gpus = args.ray_gpus_per_worker
        if gpus is None:
            gpus = default_gpus()
        report = encode_dataset(
            args.inputs, args.output_dir, args.model, batch_size=args.batch_size, num_gpus_per_worker=gpus,
            concurrency=args.ray_workers, num_cpus_per_worker=args.ray_cpus_per_worker,
            threads_per_worker=getattr(args, "threads", None),
            n_quantizers=args.n_quantizers, write_dac=getattr(args, "format", "dac") == "dac",
            dtype=args.dtype, tile_frames=args.tile_frames, seed=args.seed, progress=args.progress,
            stall_timeout=stall_timeout)
    except ValueError as exc:
        print(f"dac-fast: {exc}", file=sys.stderr)
        return 2
    except EncodeStopped as exc:
        print(f"dac-fast: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            import ray

            ray.shutdown()
    print(report.summary(), file=sys.stderr)
    print(f"codes: {Path(args.output_dir) / SHARDS_DIR}/part-*.parquet; manifest: {MANIFEST}; errors: {ERRORS}",
          file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict()))
    return 0 if report.ok else 1
