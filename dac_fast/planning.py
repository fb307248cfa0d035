"""Which files a run reads and writes, decided before any work: inputs expanded to (source, relative path) so
outputs mirror the input tree, output names, outputs that would be inputs (refused), inputs sharing an output
(failures), and the jobs left once existing outputs are judged (``dac_fast.resume``: skip, redo, or leave a
file the tools did not write alone)."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import io as aio
from .arguments import UserError
from .dacfile import DacFileError, load_any
from .resume import OutputLog
from .runner import Failure, Report

AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64", ".sd2", ".voc", ".htk", ".mat", ".pvf", ".xi",
)
CODE_EXTENSIONS = (".dac", ".json")


def expand_inputs(inputs: Iterable[Any], extensions: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[Failure]]:
    """Expand files, directories (recursive) and glob patterns.

    Returns ``([(path, relative output stem base)], failures)``: outputs mirror the tree below a root,
    so that files of one name in different folders never meet. A directory's files are relative to
    it, a glob's matches to the folder its pattern starts from (``corpus/**/*.wav``: ``corpus``),
    plain files to the deepest folder they all share (one file: its own folder). Inputs that match
    nothing are failures; so is a directory without a single file of ``extensions`` (the failure
    says what it holds instead).
    """
    exts = tuple(e.lower() for e in extensions)
    out: list[tuple[Path, Path]] = []
    failures: list[Failure] = []
    seen = set()

    def add(p: Path, rel: Path):
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append((p, rel))

    files: list[Path] = []
    for item in inputs if not isinstance(inputs, (str, os.PathLike)) else [inputs]:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            found = [q for q in sorted(p.rglob("*")) if _wanted(q, exts)]
            if not found:
                kind = "audio" if set(exts) == set(AUDIO_EXTENSIONS) else "/".join(exts)
                failures.append(Failure(s, f"no {kind} files found (it holds {_describe_contents(p)})"))
            for q in found:
                add(q, q.relative_to(p))
        elif p.exists():
            files.append(p)
        elif glob.has_magic(s):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(s), recursive=True))]
            found = [q for q in matches if q.is_file()]
            if not found:
                failures.append(Failure(s, "glob matched no files"))
            root = _glob_root(s)
            for q in found:
                add(q, _relative(q, root))
        else:
            failures.append(Failure(s, "no such file or directory"))
    if files:
        root = os.path.commonpath([os.path.abspath(q.parent) for q in files])
        for q in files:
            add(q, _relative(q, root))
    return out, failures


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from: its leading components without wildcards."""
    parts = Path(os.path.expanduser(pattern)).parts[:-1]
    literal = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return os.path.join(*literal) if literal else "."


def _relative(path: Path, root: str) -> Path:
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    return Path(path.name) if ".." in rel.parts else rel  # a pattern like a/*/../b.wav


def _wanted(q: Path, exts) -> bool:
    if not q.is_file() or q.suffix.lower() not in exts or q.name.startswith("."):
        return False  # hidden files: our temporaries and records, editors' and OSes' droppings
    if _is_npy_codes(q):
        return False
    return q.suffix.lower() != ".json" or _json_has_codes(q)


def _describe_contents(directory: Path) -> str:
    counts: dict[str, int] = {}
    for q in directory.rglob("*"):
        if q.is_file() and not q.name.startswith("."):
            ext = ".codes.npy" if _is_npy_codes(q) else (q.suffix.lower() or "(no extension)")
            counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return "no files"
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return ", ".join(f"{n} {ext}" for ext, n in top) + (" ..." if len(counts) > 5 else "")


def _is_npy_codes(p: Path) -> bool:
    return p.name.endswith(".codes.npy")


def _json_has_codes(p: Path) -> bool:
    return p.with_name(p.name[: -len(".json")] + ".codes.npy").exists()


def encoded_output(output_dir: Path, rel: Path, fmt: str) -> Path:
    """The primary output of encoding ``rel``: ``.dac``, or the ``.json`` (written last) for npy."""
    stem = output_dir / rel.with_suffix("")
    if fmt == "dac":
        return stem.with_name(stem.name + ".dac")
    return stem.with_name(stem.name + ".json")


def codes_intact(out: Path, holds: dict) -> str | None:
    """None when the codes output reads back with the recorded shape, else what is wrong."""
    try:
        f = load_any(out)
    except (DacFileError, OSError, ValueError) as exc:
        return str(exc).split(": ", 1)[-1]
    if list(f.codes.shape) != holds.get("shape"):
        return f"codes shape {list(f.codes.shape)}, recorded {holds.get('shape')}"
    return None


def audio_intact(out: Path, holds: dict) -> str | None:
    """None when the decoded audio's header shows the recorded channels and length."""
    try:
        _, channels, frames = aio.audio_info(out)
    except aio.AudioError as exc:
        return exc.reason
    if [channels, frames] != [holds.get("channels"), holds.get("frames")]:
        return f"{channels} channels x {frames} frames, recorded {holds.get('channels')} x {holds.get('frames')}"
    return None


def companion_files(out: Path) -> list[Path]:
    """The files written with the output ``out`` (recorded under its name): npy format's codes."""
    return [out.with_name(out.name[: -len(".json")] + ".codes.npy")] if out.suffix == ".json" else []


def refuse_outputs_onto_inputs(pairs) -> None:
    """A :class:`UserError` (argument ``output_dir``) when an output of ``[(input, output)]`` would be
    any input itself (a symbolic or hard link too: same file), whatever ``overwrite`` says: a run never
    replaces its own input."""
    inputs = {}
    for src, _ in pairs:
        with contextlib.suppress(OSError):  # an input gone since it was listed fails later, alone
            inputs[_file_identity(src)] = src
    for src, out in pairs:
        for p in (out, *companion_files(Path(out))):
            try:
                hit = inputs.get(_file_identity(p))
            except OSError:  # nothing there yet
                continue
            if hit is not None:
                raise UserError(f"the output of {src} would be {p}, which is the input {hit}; nothing was "
                                "done: choose another output directory", "output_dir")


def _file_identity(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def output_collisions(pairs) -> tuple[list, list[Failure]]:
    """Split ``[(input, output)]`` into the pairs whose output is theirs alone and a failure for every input
    that shares its output with another (none of those is written: which one the user meant is unknown)."""
    by_output: dict[str, list] = {}
    for src, out in pairs:
        by_output.setdefault(os.path.abspath(out), []).append((src, out))
    kept, failures = [], []
    for group in by_output.values():
        if len(group) == 1:
            kept += group
            continue
        sources = [str(src) for src, _ in group]
        stems = {os.path.splitext(os.path.abspath(src))[0] for src in sources}
        why = ("different extensions of one stem" if len(stems) == 1
               else "one relative path under different input folders")
        for src in sources:
            failures.append(Failure(src, f"output {group[0][1]} would come from {len(sources)} inputs "
                                         f"({', '.join(sources)}): {why}; none of them is written"))
    return kept, failures


def plan_jobs(expanded, out_of, log: OutputLog, intact, overwrite: bool, report: Report):
    """The (source, output) jobs of this run, decided before any work. An output that would be an input
    refuses the run; inputs sharing an output fail; an existing output is skipped only when its record
    vouches for it, redone when the record shows it is ours, and left alone (a failure) when the tools did
    not write it, unless ``overwrite``; made with another setup, the run is refused (:class:`UserError`)."""
    pairs = [(src, out_of(rel)) for src, rel in expanded]
    refuse_outputs_onto_inputs(pairs)
    pairs, collisions = output_collisions(pairs)
    report.failures += collisions
    jobs, other_setup = [], []
    for src, out in pairs:
        existing = [] if overwrite else [p for p in (out, *companion_files(out)) if p.exists()]
        if existing:
            verdict, why = log.verdict(src, out, intact, existing)
            if verdict == "skip":
                report.skipped.append((str(src), str(out)))
                continue
            if verdict == "other setup":
                other_setup.append((out, why))
                continue
            if verdict == "not ours":
                report.failures.append(Failure(str(src), why))
                continue
            report.redone.append(Failure(str(src), why))
        jobs.append((src, out))
    if other_setup:
        out, why = other_setup[0]
        raise UserError(
            f"{len(other_setup)} existing output(s) in {log.output_dir} were made with a different setup ({why}), "
            f"e.g. {out}. Use another output directory, or overwrite=True (--overwrite) to redo them.", "output_dir")
    return jobs
