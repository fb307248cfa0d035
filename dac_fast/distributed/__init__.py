"""Encode datasets beyond one machine with Ray Data: :func:`encode_dataset`.

Optional extra: ``pip install .[ray]`` (``ray[data]``, ``pyarrow``). Nothing here is imported by
the rest of dac_fast except the CLI hook (``command``, which imports neither ray nor pyarrow);
the public names below are loaded on first use.

Modules: ``schema`` (output layout, the one shard schema, manifest/errors tables, reading
results), ``stages`` (read tasks, encoder actors, write tasks), ``driver`` (:func:`encode_dataset`:
the pipeline, the stall watchdog, the summary), ``cluster`` (joining Ray, shared with
``dac-fast serve --ray``), ``command`` (``dac-fast encode --ray``).

Pipeline (one Ray Data dataset, streamed)::

    inputs (paths/globs/dirs on a filesystem every node sees, or a ray.data.Dataset)
      -> read + resample + loudness   CPU tasks (``map``), dac_fast.io -- same as dac_fast.batch;
                                      no torch import
      -> encode                       actor pool (class ``map_batches``): the model is loaded once
                                      per actor, one GPU each (``num_gpus_per_worker``) or CPU
                                      with a fractional ``num_cpus`` so readers are never starved
      -> write                        CPU tasks: one Parquet shard per batch (atomic), optional
                                      ``.dac`` file per input (DacFile, atomic)
      -> driver                       only small status rows -> manifest.parquet, errors.parquet

Output directory layout::

    OUTPUT/shards/part-*.parquet   schema.SHARD_SCHEMA: path, sample_rate, original_length, channels,
                                   n_codebooks, frames, codes (binary: uint16 little-endian, C order,
                                   shape (channels, n_codebooks, frames)), input_db (list<float>)
    OUTPUT/dac/<mirrored tree>.dac one per input when ``write_dac=True`` (original DACFile format)
    OUTPUT/manifest.parquet        completed inputs: path, shard, channels, frames, duration
    OUTPUT/errors.parquet          failed inputs of the latest run: path, reason
    OUTPUT/run.json                model rate / hop / codebooks (a resume with another model is refused)

Exactness: items are batched only with items of the same frame count (``bucket="exact"`` of
dac_fast.batch), padded to a multiple of the hop exactly as ``encode_files`` does, so codes
equal the single-machine path bit for bit.

Faults (details in :func:`encode_dataset`): every input ends up either in a shard (completed) or
in the errors table. Unreadable / corrupt / NaN audio and model failures are caught per input;
inputs of a block lost to worker crashes past the retries are listed as ``lost``; a job in which
no block completes for ``stall_timeout`` seconds is stopped and what remains is listed as lost.
Shards are the source of truth for completion and are written atomically, so re-running with
the same ``output`` skips completed inputs and retries the rest.
"""

from .._lazy import lazy_module

# here, below both the CLI hook (command) and the driver, so neither imports the other for it
DEFAULT_STALL_TIMEOUT = 1800.0  # seconds without a completed block before the driver stops the job

# public name -> submodule that defines it
_EXPORTS = {
    "encode_dataset": "driver",
    "EncodeStopped": "driver",
    "worker_runtime_env": "cluster",
    "add_ray_arguments": "command",
    "run_from_cli": "command",
    "read_codes": "schema",
    "read_manifest": "schema",
    "read_errors": "schema",
    "codes_from_row": "schema",
    "SHARD_SCHEMA": "schema",
    "SHARD_COLUMNS": "schema",
    "SHARDS_DIR": "schema",
    "DAC_DIR": "schema",
    "MANIFEST": "schema",
    "ERRORS": "schema",
    "RUN_INFO": "schema",
    "AUDIO_COLUMNS": "stages",
    "CRASH_ENV": "stages",
    "ENCODER_CRASH_ENV": "stages",
}

__all__ = ["DEFAULT_STALL_TIMEOUT", *_EXPORTS]
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
