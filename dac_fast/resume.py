"""What made each output of a batch run, so that a re-run trusts only outputs it can vouch for.

Every finished output gets one line in ``OUTDIR/.dac-fast-outputs.jsonl``: the output's path
(relative to OUTDIR), its size, what the output holds (codes shape / audio frames), the source's
size and mtime, and the fingerprint of the *setup* that made it (the model's identity and every
setting that changes the result). Setups are stored once per run as their own lines. The file is
append-only (one short write per output; a line cut by a crash is ignored) and is compacted at the
start of a run when it holds superseded lines.

On a re-run, an existing output is

* kept ("skipped") when its record matches: same setup, same source size and mtime, and the
  output still has the recorded size and reads back with the recorded shape;
* redone when its source changed or it is damaged (unreadable, another shape) at its recorded size,
  or when a run was killed between writing it and recording it (a "claim" line, written before each
  output and withdrawn when a run ends without it, vouches for a file at least as new as the claim);
* not ours, a failure of that input, when nothing records or claims it (the user's file, or any file
  that happens to have the output's name) or it no longer has the size it was written with: a file
  the tools did not write is never replaced without ``overwrite``;
* refused, for the whole run, when it was made with another setup (another model, preset, seed,
  ``n_quantizers``, loudness target, dtype ...): mixing codes from two models in one corpus is
  never what the user wants, and silently redoing hours of work is not either. ``overwrite``
  redoes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

RECORD_FILE = ".dac-fast-outputs.jsonl"
_SAMPLE_BYTES = 1 << 20  # bytes hashed from each end of a weight file
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_MTIME_SLACK_NS = 2 * 10**9  # filesystems with coarse timestamps (FAT: 2 s) may date a file before its claim


def file_stamp(path) -> list[int]:
    """[size, mtime_ns] of a file: changes when the file is rewritten or replaced."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _content_sample(path: Path) -> str:
    """sha1 of a file's size, first and last MiB: names a weight file by content, independent of its
    path and mtime (a copied checkpoint is the same model), cheap for 300 MB files."""
    h = hashlib.sha1()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def _weights_fingerprint(model) -> str:
    """sha1 over each parameter's shape and first 4096 values: names an in-memory model (also when it
    is wrapped, or moved to another device or dtype)."""
    import torch

    h = hashlib.sha1()
    with torch.no_grad():
        for p in model.parameters():
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().reshape(-1)[:4096].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(spec: Any, seed: int = 0) -> dict:
    """What names a model for resume, computed without loading weights where the spec allows.

    preset -> name and seed; local directory -> content samples of config.json and the weight
    files; checkpoint file -> its content sample; hub id -> the id; a model object -> a
    fingerprint of its weights."""
    from .configuration import PRESETS

    if hasattr(spec, "config") and hasattr(spec, "encode"):
        return {"weights": _weights_fingerprint(spec)}
    s = str(spec)
    if s in PRESETS:
        return {"preset": s, "seed": int(seed)}
    p = Path(s).expanduser()
    if p.is_dir():
        return {"directory": {q.name: _content_sample(q) for q in identity_files(p)}}
    if p.is_file():
        return {"checkpoint": _content_sample(p)}
    return {"hub": s}


def identity_files(directory: Path) -> list[Path]:
    """The files of a model directory that name the model (read by :func:`model_identity`)."""
    return sorted(q for q in Path(directory).iterdir()
                  if q.is_file() and (q.name == "config.json" or q.suffix in _WEIGHT_SUFFIXES))


def setup_key(setup: dict) -> str:
    return hashlib.sha1(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


class OutputLog:
    """The record file of one output directory for one run's ``setup`` (a JSON-able dict)."""

    def __init__(self, output_dir: Path, setup: dict):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / RECORD_FILE
        self.setup = setup
        self.key = setup_key(setup)
        self.setups: dict[str, dict] = {}
        self.records: dict[str, dict] = {}
        self.claims: dict[str, int] = {}  # output -> when a run started writing it (ns), not yet recorded
        self._open_claims: set[str] = set()  # this run's claims without a record yet
        self._lock = threading.Lock()
        self._file = None
        self._read()

    def _read(self):
        lines = 0
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    lines += 1
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash
                    if "setup" in rec and "settings" in rec:
                        self.setups[rec["setup"]] = rec["settings"]
                    elif "output" in rec:
                        self.records[rec["output"]] = rec
                        self.claims.pop(rec["output"], None)
                    elif "claim" in rec:
                        self.claims[rec["claim"]] = int(rec.get("at", 0))
                    elif "unclaim" in rec:
                        self.claims.pop(rec["unclaim"], None)
        except FileNotFoundError:
            return
        # every output leaves a claim line and its record: rewrite the file only once dead lines (spent claims,
        # superseded records) outnumber live ones, not at every run that wrote something
        if lines > 2 * (len(self.records) + len(self.setups) + len(self.claims)):
            self._compact()

    def _compact(self):
        from .io import atomic_write_text

        used = {r["setup"] for r in self.records.values()}
        text = "".join(json.dumps({"setup": k, "settings": v}) + "\n" for k, v in self.setups.items() if k in used)
        text += "".join(json.dumps(r) + "\n" for r in self.records.values())
        text += "".join(json.dumps({"claim": k, "at": v}) + "\n" for k, v in self.claims.items())
        atomic_write_text(self.path, text)

    def _rel(self, out: Path) -> str:
        return os.path.relpath(out, self.output_dir)

    def verdict(self, src: Path, out: Path, valid: Callable[[Path, dict], str | None],
                existing: list[Path]) -> tuple[str, str]:
        """("skip" | "redo" | "not ours" | "other setup", reason) for the output ``out`` of ``src``, of which the
        files ``existing`` (``out`` and/or its companion files) exist."""
        rel = self._rel(out)
        rec = self.records.get(rel)
        # a claim is newer than any record of its output (_read drops claims that a record follows)
        if rel in self.claims and all(os.stat(p).st_mtime_ns >= self.claims[rel] - _MTIME_SLACK_NS for p in existing):
            return "redo", "a run was stopped between writing it and recording it"
        if rec is None:
            return "not ours", (f"{existing[0]} exists and dac-fast did not write it (nothing in {RECORD_FILE} "
                                "records it); not replaced: use --overwrite (overwrite=True) to replace it")
        if rec.get("setup") != self.key:
            return "other setup", describe_difference(self.setups.get(rec.get("setup"), {}), self.setup)
        try:
            size = os.stat(out).st_size
        except OSError:  # its companion is there, the output itself is gone: the pair is redone
            return "redo", f"{out} is missing"
        if rec.get("size") != size:
            return "not ours", (f"{out} was changed since dac-fast wrote it ({size} bytes, {rec.get('size')} "
                                "written); not replaced: use --overwrite (overwrite=True) to replace it")
        try:
            if rec.get("source") != file_stamp(src):
                return "redo", "the source changed since its output was made"
        except OSError as exc:
            return "redo", f"cannot stat its source: {exc}"
        problem = valid(out, rec.get("holds", {}))
        if problem:
            return "redo", f"the existing output is damaged ({problem})"
        return "skip", ""

    def claim(self, out: Path) -> None:
        """Note that this run is about to write ``out``: should it be killed before :meth:`add`, the next run
        knows the file at ``out`` (if at least as new as this note) as its own."""
        self._append({"claim": self._rel(out), "at": time.time_ns()})
        with self._lock:
            self._open_claims.add(self._rel(out))

    def add(self, src: Path, out: Path, holds: dict) -> None:
        """Record a finished output (called after its atomic rename)."""
        rec = {"output": self._rel(out), "size": os.stat(out).st_size, "holds": holds,
               "source": file_stamp(src), "setup": self.key}
        with self._lock:  # should the record fail to be written, the claim stays: it still vouches for the file
            self._open_claims.discard(rec["output"])
        self._append(rec)
        with self._lock:
            self.records[rec["output"]] = rec

    def _append(self, line: dict) -> None:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a+", encoding="utf-8")
                self._file.seek(0, os.SEEK_END)
                if self._file.tell() > 0:  # start on a fresh line after a line cut by a crash
                    self._file.seek(self._file.tell() - 1)
                    last = self._file.read(1)
                    self._file.seek(0, os.SEEK_END)
                    if last != "\n":
                        self._file.write("\n")
                if self.key not in self.setups:
                    self._file.write(json.dumps({"setup": self.key, "settings": self.setup}) + "\n")
                    self.setups[self.key] = self.setup
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Withdraw this run's claims that got no record (their writes failed or never ran: no file of ours is
        there), so that only a killed run leaves claims behind."""
        with contextlib.suppress(OSError):  # a full disk: the claims stay, vouching only for files newer than them
            for rel in sorted(self._open_claims):
                self._append({"unclaim": rel})
        self._open_claims.clear()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
