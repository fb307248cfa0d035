"""``.dac`` files (the original ``DACFile`` format, version 1.0.0) and a dataset-friendly format.

``.dac`` layout (what the original ``DACFile.save`` writes): ``numpy.save`` of a 0-d object
array holding the pickled dict::

    {"codes": uint16 (channels, n_codebooks, frames),
     "metadata": {"input_db": float32 array, "original_length": int, "sample_rate": int,
                  "chunk_length": int, "channels": int, "padding": bool,
                  "dac_version": "1.0.0"}}

:func:`DacFile.save` writes exactly that (so the original ``DACFile.load`` / ``decompress``
read it) and :func:`DacFile.load` reads it - and files the original wrote - WITHOUT
``allow_pickle``: the ``.npy`` header is parsed here and the payload goes through
:class:`RestrictedUnpickler`, which resolves only numpy's array/dtype reconstruction functions
and a few plain builtins. A crafted ``.dac`` that references ``os.system``, ``eval``,
``subprocess`` ... raises :class:`UnsafeDacFileError` before anything runs.

Our codes are whole-file codes (the model tiles long inputs exactly), so we write
``padding=True`` and ``chunk_length=frames``: the original ``decompress`` then decodes the
file in one pass.

Dataset format (``--format npy``): per input ``NAME.codes.npy`` (uint16, (channels,
n_codebooks, frames), plain .npy without pickle) plus ``NAME.json`` with the metadata; the
JSON is written last, so its presence marks a complete pair.
"""

from __future__ import annotations

import ast
import io
import json
import math
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import PathLike, atomic_write, atomic_write_text, open_problem, os_reason

DAC_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("1.0.0",)
NPY_MAGIC = b"\x93NUMPY"
# frames of padding the original chunked compress adds around the signal (its model delay), bounded
_DELAY_FRAMES = 16


class DacFileError(ValueError):
    """A ``.dac`` file is malformed, truncated or of an unsupported version."""


class UnsafeDacFileError(DacFileError):
    """A ``.dac`` file's pickle references something other than numpy arrays/plain data."""


# ----------------------------------------------------------------------------------------------
# restricted unpickling
# ----------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    # ndarray / dtype reconstruction (numpy 1.x and 2.x module names)
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    # plain builtins used by protocol-2 pickles of containers/bytes
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bool"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("_codecs", "encode"),  # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    ("collections", "OrderedDict"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array/dtype reconstruction and plain builtins."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy"):
                # import by attribute on the real numpy package, never arbitrary modules
                mod = __import__(module, fromlist=[name])
                return getattr(mod, name)
            return super().find_class(module, name)
        raise UnsafeDacFileError(f"refusing to unpickle global {module}.{name}")

    def persistent_load(self, pid):  # pragma: no cover - never valid in .dac
        raise UnsafeDacFileError("persistent ids are not allowed")


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def read_npy_object(path_or_bytes) -> Any:
    """Read a ``.npy`` whose payload is a pickled 0-d object array, safely.

    Parses the npy header (versions 1-3) itself, then unpickles the payload with
    :class:`RestrictedUnpickler`. Returns the object (``arr[()]``).
    """
    if isinstance(path_or_bytes, (bytes, bytearray)):
        buf = bytes(path_or_bytes)
        name = "<bytes>"
    else:
        name = str(path_or_bytes)
        with open(path_or_bytes, "rb") as f:
            buf = f.read()
    if len(buf) < 10 or not buf.startswith(NPY_MAGIC):
        raise DacFileError(f"{name}: not a .dac/.npy file (bad magic)")
    major = buf[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", buf[8:10])
        start = 10
    elif major in (2, 3):
        if len(buf) < 12:
            raise DacFileError(f"{name}: truncated header")
        (hlen,) = struct.unpack("<I", buf[8:12])
        start = 12
    else:
        raise DacFileError(f"{name}: unsupported .npy version {major}")
    if len(buf) < start + hlen:
        raise DacFileError(f"{name}: truncated header")
    header_txt = buf[start : start + hlen].decode("latin1" if major < 3 else "utf8")
    try:
        header = ast.literal_eval(header_txt)
    except Exception:
        raise DacFileError(f"{name}: malformed .npy header") from None
    if not isinstance(header, dict) or header.get("descr") != "|O":
        raise DacFileError(f"{name}: not a pickled-object .npy (descr={header.get('descr') if isinstance(header, dict) else '?'})")
    payload = buf[start + hlen :]
    try:
        obj = restricted_loads(payload)
    except UnsafeDacFileError as exc:
        raise UnsafeDacFileError(f"{name}: {exc}") from None
    except Exception as exc:
        raise DacFileError(f"{name}: corrupt or truncated pickle payload ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.shape == ():
        return obj[()]
    return obj


# ----------------------------------------------------------------------------------------------
# DacFile
# ----------------------------------------------------------------------------------------------
@dataclass
class DacFile:
    """Codes of one audio file plus what decoding needs to restore it."""

    codes: np.ndarray  # uint16 (channels, n_codebooks, frames)
    input_db: np.ndarray  # float32, loudness (LUFS) at the model rate before normalization
    original_length: int  # samples at the ORIGINAL rate
    sample_rate: int  # the ORIGINAL file's rate
    chunk_length: int  # frames per chunk; == frames for our whole-file codes
    channels: int
    padding: bool = True
    dac_version: str = DAC_VERSION
    extra: dict = field(default_factory=dict)  # not stored in .dac (kept in the npy sidecar)

    def __post_init__(self):
        codes = np.asarray(self.codes)
        if codes.ndim != 3:
            raise DacFileError(f"codes must be (channels, n_codebooks, frames), got shape {codes.shape}")
        if codes.dtype.kind not in "iu":  # bools and floats are no codes, whatever their values
            raise DacFileError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() > 65535):
            raise DacFileError("codes out of uint16 range")
        self.codes = codes.astype(np.uint16, copy=False)
        self.input_db = np.asarray(self.input_db, dtype=np.float32).reshape(-1)
        self.original_length = int(self.original_length)
        self.sample_rate = int(self.sample_rate)
        self.chunk_length = int(self.chunk_length)
        self.channels = int(self.channels)
        self.padding = bool(self.padding)

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[1])

    @property
    def frames(self) -> int:
        return int(self.codes.shape[2])

    @property
    def duration(self) -> float:
        return self.original_length / float(self.sample_rate)

    def fits_frame_rate(self, model_rate: int, hop: int) -> bool:
        """Whether the frame count fits a model of ``model_rate`` Hz and ``hop`` samples per frame.

        The file does not name its model, but its frame count follows from its duration: whole-file
        codes (``padding``) have ``ceil(samples at the model rate / hop)`` frames; chunked files
        (the original's ``padding=False``) whole chunks covering the signal plus the model's delay.
        The official models run at 50, 75 and ~86 frames/s; very short files fit several."""
        n = math.ceil(self.original_length * model_rate / self.sample_rate)
        expected = math.ceil(n / hop)
        slack = 2 + 0.02 * expected  # resamplers round lengths differently
        if self.padding or self.chunk_length >= self.frames:
            return abs(self.frames - expected) <= slack
        # chunked: covers the signal, and the last chunk starts before its end (+ the delay padding)
        return expected - slack <= self.frames and self.frames - self.chunk_length <= expected + slack + _DELAY_FRAMES

    def check_fits_model(self, model_rate: int, hop: int, n_codebooks: int | None, codebook_size: int = 1024,
                         name: str = "<dac>") -> None:
        """Raise :class:`DacFileError` when a model of this rate/hop/codebook count did not make the file
        (decoding it would give noise)."""
        if n_codebooks is not None and self.n_codebooks > n_codebooks:
            raise DacFileError(f"{name}: has {self.n_codebooks} codebooks, the model has {n_codebooks}")
        msr, mhop = self.extra.get("model_sample_rate"), self.extra.get("hop_length")
        if (msr is not None and int(msr) != model_rate) or (mhop is not None and int(mhop) != hop):
            raise DacFileError(f"{name}: encoded by a {msr} Hz / hop {mhop} model, the model is {model_rate} Hz / hop {hop}")
        if self.frames == 0:
            raise DacFileError(f"{name}: no frames")
        if self.codes.shape[0] != self.channels:
            raise DacFileError(f"{name}: codes have {self.codes.shape[0]} rows but channels={self.channels}")
        if not self.fits_frame_rate(model_rate, hop):
            raise DacFileError(
                f"{name}: {self.frames} frames for {self.duration:.3f} s is {self.frames / self.duration:.1f} frames/s; "
                f"the model makes {model_rate / hop:.1f} frames/s ({model_rate} Hz, hop {hop}): encoded by another model")
        if self.codes.size and int(self.codes.max()) >= codebook_size:
            raise DacFileError(f"{name}: code {int(self.codes.max())} >= codebook size {codebook_size}")

    # -------------------------------------------------------------------- .dac (original format)
    def to_artifacts(self) -> dict:
        """The dict the original ``DACFile.save`` pickles (same keys, types and order)."""
        return {
            "codes": self.codes.astype(np.uint16),
            "metadata": {
                "input_db": self.input_db.astype(np.float32),
                "original_length": int(self.original_length),
                "sample_rate": int(self.sample_rate),
                "chunk_length": int(self.chunk_length),
                "channels": int(self.channels),
                "padding": bool(self.padding),
                "dac_version": DAC_VERSION,
            },
        }

    def save(self, path: PathLike) -> Path:
        """Write ``path`` (suffix forced to ``.dac``, as the original) atomically."""
        path = Path(path).with_suffix(".dac")
        with atomic_write(path, "wb") as f:
            f.write(self.to_bytes())
        return path

    def to_bytes(self) -> bytes:
        """The bytes of the ``.dac`` file (deterministic: the same codes and metadata give the same bytes)."""
        buf = io.BytesIO()
        np.save(buf, self.to_artifacts())
        return buf.getvalue()

    @classmethod
    def from_artifacts(cls, artifacts: Any, name: str = "<dac>") -> "DacFile":
        if not isinstance(artifacts, dict) or "codes" not in artifacts or "metadata" not in artifacts:
            raise DacFileError(f"{name}: not a DAC file (missing 'codes'/'metadata')")
        meta = artifacts["metadata"]
        if not isinstance(meta, dict):
            raise DacFileError(f"{name}: malformed metadata")
        version = meta.get("dac_version", None)
        if version not in SUPPORTED_VERSIONS:
            raise DacFileError(f"{name}: unsupported dac_version {version!r} (supported: {SUPPORTED_VERSIONS})")
        missing = [k for k in ("input_db", "original_length", "sample_rate", "chunk_length", "channels", "padding") if k not in meta]
        if missing:
            raise DacFileError(f"{name}: metadata lacks {missing}")
        codes = artifacts["codes"]
        if not isinstance(codes, np.ndarray):
            raise DacFileError(f"{name}: codes is not an array")
        if hasattr(codes, "numpy") and not isinstance(codes, np.ndarray):  # pragma: no cover
            codes = codes.numpy()
        return cls(
            codes=codes,
            input_db=meta["input_db"],
            original_length=meta["original_length"],
            sample_rate=meta["sample_rate"],
            chunk_length=meta["chunk_length"],
            channels=meta["channels"],
            padding=meta["padding"],
            dac_version=version,
        )

    @classmethod
    def load(cls, path: PathLike) -> "DacFile":
        """Read a ``.dac`` (ours or the original's) without executing pickle code."""
        p = Path(path)
        problem = open_problem(p)
        if problem:
            raise DacFileError(f"{p}: {problem}")
        if p.stat().st_size == 0:
            raise DacFileError(f"{p}: empty file (0 bytes)")
        return cls.from_artifacts(read_npy_object(p), str(p))

    # -------------------------------------------------------------------- dataset format (npy)
    def metadata_json(self, codes_file: str) -> dict:
        return {
            "codes_file": codes_file,
            "codes_shape": list(self.codes.shape),
            "codes_dtype": "uint16",
            "input_db": [float(v) for v in self.input_db],
            "original_length": self.original_length,
            "sample_rate": self.sample_rate,
            "chunk_length": self.chunk_length,
            "channels": self.channels,
            "padding": self.padding,
            "dac_version": self.dac_version,
            **self.extra,
        }

    def save_npy(self, stem_path: PathLike) -> tuple[Path, Path]:
        """Write ``STEM.codes.npy`` then ``STEM.json`` (both atomically; JSON last)."""
        stem_path = Path(stem_path)
        codes_path = stem_path.with_name(stem_path.name + ".codes.npy")
        json_path = stem_path.with_name(stem_path.name + ".json")
        with atomic_write(codes_path, "wb") as f:
            np.save(f, self.codes.astype(np.uint16), allow_pickle=False)
        atomic_write_text(json_path, json.dumps(self.metadata_json(codes_path.name)) + "\n")
        return codes_path, json_path

    @classmethod
    def load_npy(cls, json_path: PathLike) -> "DacFile":
        """Read the pair written by :meth:`save_npy` (give the ``.json`` or ``.codes.npy``)."""
        p = Path(json_path)
        if p.name.endswith(".codes.npy"):
            p = p.with_name(p.name[: -len(".codes.npy")] + ".json")
        problem = open_problem(p)
        if problem:
            raise DacFileError(f"{p}: {problem}")
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise DacFileError(f"{p}: unreadable metadata ({exc})") from None
        try:
            codes = np.load(p.with_name(meta["codes_file"]), allow_pickle=False)
        except OSError as exc:
            raise DacFileError(f"{p}: its codes file {meta['codes_file']}: {os_reason(exc)}") from None
        except (ValueError, KeyError) as exc:
            raise DacFileError(f"{p}: unreadable codes ({exc})") from None
        known = ("input_db", "original_length", "sample_rate", "chunk_length", "channels", "padding", "dac_version")
        extra = {k: v for k, v in meta.items() if k not in known and k not in ("codes_file", "codes_shape", "codes_dtype")}
        return cls(codes=codes, extra=extra, **{k: meta[k] for k in known})


def load_any(path: PathLike) -> DacFile:
    """Load a ``.dac`` or a dataset-format ``.json``/``.codes.npy``."""
    p = Path(path)
    if p.suffix == ".json" or p.name.endswith(".codes.npy"):
        return DacFile.load_npy(p)
    return DacFile.load(p)
