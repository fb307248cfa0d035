"""The output directory of a Ray encode: its layout, the one shard schema, manifest and errors tables.

Writer, reader, resume and summary all go through this module, so a column is named once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import io as aio

# a clear MissingDependencyError (package + pip extra) instead of a bare ImportError
pa = aio.require("pyarrow", "the Ray engine's Parquet shards")
pq = aio.require("pyarrow.parquet", "the Ray engine's Parquet shards")

SHARDS_DIR = "shards"
DAC_DIR = "dac"
MANIFEST = "manifest.parquet"
ERRORS = "errors.parquet"
RUN_INFO = "run.json"

# One row per completed input. codes: uint16 little-endian, C order, shape (channels, n_codebooks, frames).
SHARD_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("sample_rate", pa.int32()),  # the input's rate, not the model's
    ("original_length", pa.int64()),
    ("channels", pa.int32()),
    ("n_codebooks", pa.int32()),
    ("frames", pa.int32()),
    ("codes", pa.binary()),
    ("input_db", pa.list_(pa.float32())),
])
SHARD_COLUMNS = tuple(SHARD_SCHEMA.names)

# Completed inputs (derived from the shards by manifest_row) and failed inputs of the latest run.
MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("shard", pa.string()),
    ("channels", pa.int32()),
    ("frames", pa.int32()),
    ("duration", pa.float64()),
])
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])

# the shard columns a manifest row is made of (resume reads only these, never the codes)
_MANIFEST_SOURCE = ("path", "sample_rate", "original_length", "channels", "frames")


def shard_table(rows: list[dict]) -> pa.Table:
    """Rows with the SHARD_SCHEMA keys -> a table in that schema (types checked by pyarrow)."""
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def manifest_row(shard: str, row: dict) -> dict:
    """The manifest row of one shard row (or of any dict holding the same columns)."""
    return {"path": str(row["path"]), "shard": shard, "channels": int(row["channels"]),
            "frames": int(row["frames"]),
            "duration": int(row["original_length"]) / max(int(row["sample_rate"]), 1)}


def codes_from_row(row: dict) -> np.ndarray:
    """The uint16 codes array (channels, n_codebooks, frames) of one shard row."""
    shape = (int(row["channels"]), int(row["n_codebooks"]), int(row["frames"]))
    return np.frombuffer(row["codes"], dtype="<u2").reshape(shape)


def shard_files(output: Path) -> list[Path]:
    d = Path(output) / SHARDS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("part-*.parquet") if not p.name.startswith(aio.TMP_PREFIX))


def completed(output: Path) -> dict:
    """``{path: manifest row}`` of every input in a shard: the source of truth (shards are atomic)."""
    done = {}
    for shard in shard_files(output):
        try:
            table = pq.read_table(shard, columns=list(_MANIFEST_SOURCE))
        except Exception:  # unreadable shard (should not happen: atomic writes): redo its inputs
            continue
        for row in table.to_pylist():
            done[row["path"]] = manifest_row(shard.name, row)
    return done


def read_codes(output) -> dict:
    """``{path: codes (channels, n_codebooks, frames) uint16}`` for every completed input."""
    out = {}
    for shard in shard_files(Path(output)):
        for row in pq.read_table(shard).to_pylist():
            out[row["path"]] = codes_from_row(row)
    return out


def read_manifest(output) -> list[dict]:
    """Rows ``{"path", "shard", "channels", "frames", "duration"}`` of the completed inputs."""
    return _read_table(Path(output) / MANIFEST)


def read_errors(output) -> list[dict]:
    """Rows ``{"path", "reason"}`` of the latest run's failed inputs."""
    return _read_table(Path(output) / ERRORS)


def _read_table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.exists() else []


def write_summary(output: Path, done: dict, errors: dict) -> None:
    """Write manifest.parquet (``done``: {path: manifest row}) and errors.parquet ({path: reason}), atomically."""
    rows = [done[p] for p in sorted(done)]
    with aio.atomic_path(output / MANIFEST) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), str(tmp))
    rows = [{"path": p, "reason": errors[p]} for p in sorted(errors)]
    with aio.atomic_path(output / ERRORS) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), str(tmp))
