"""Batch encoding and decoding of audio files: ``encode_files`` / ``decode_files``.

Pipeline (encode): check the arguments and the output directory -> expand inputs (directories
recursively, globs) -> decide per input whether its output can be trusted (``dac_fast.resume``:
skip, redo, or refuse a run that would mix setups) -> sort by duration (from file headers) ->
read + resample + loudness-normalize ahead of the model (``_Prefetcher``: a reader thread pool,
a window and a memory budget; soundfile, soxr and pyloudnorm release the GIL in their C code) ->
bucket into batches -> one ``model.encode`` per batch, items retried one by one when a batch
fails (``run_with_fallback``) -> write each output atomically (``_WriteQueue``: a writer pool
with a bounded number of waiting results) -> record the output -> report.

Batching and exactness. DAC's convolutions see zeros past the end of a signal only when the
signal really ends there: zero-padding a shorter item to a longer one in the same batch
changes the codes of its last few frames (measured: the last ~4 of 20 frames differ). So the
default ``bucket="exact"`` only batches items with the same frame count ``ceil(n / hop)``
(after right-padding each item to a multiple of the hop, as the original ``preprocess``
does): the codes are then bit-for-bit those of encoding each file alone. Datasets of
fixed-length clips batch fully. ``bucket="mask"`` batches neighbours in sorted order of any
lengths and passes dac_fast's ``encode(padding_mask=)``, which zeroes each item's input past its
own length at every layer: codes again identical to encoding each file alone (dac_fast models
only). ``bucket="pad"`` batches neighbours padded to the longest without a mask and trims codes
to ``ceil(n / hop)`` per item (any model, but the last few frames of shorter items can differ
from a solo encode).

Long files: the model tiles long inputs internally with a halo so that codes equal the
whole-file codes and memory is bounded by the tile (``tile_frames`` is passed through when
the model supports it); this module never windows the model itself.

No lost work, no wrong work: outputs are written to a temporary file in the output directory and
renamed; a re-run skips outputs whose record matches (same model and settings, unchanged source,
output intact) and redoes the ones it knows as its own; a file the tools did not write is never
replaced without ``overwrite`` (``dac_fast.resume``); bad inputs are reported (path + reason) and
skipped; a full disk stops the run; Ctrl-C / SIGTERM finishes in-flight writes and removes
temporaries. Mistakes in the arguments raise :class:`UserError` before any model is loaded.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import io as aio
from .arguments import UserError, check_positive, prepare_output_dir
from .configuration import PRESETS
from .dacfile import DacFile, load_any
from .job_model import JobModel, load_model, model_rate_and_hop, supports_padding_mask
from .planning import (
    AUDIO_EXTENSIONS,
    CODE_EXTENSIONS,
    audio_intact,
    codes_intact,
    encoded_output,
    expand_inputs,
    plan_jobs,
)
from .resume import OutputLog
from .runner import Failure, Report, _Item, _run, _to_device

# the names users import from here, beside encode_files/decode_files/info
__all__ = ["encode_files", "decode_files", "info", "load_model", "model_rate_and_hop", "UserError", "Failure",
           "Report", "AUDIO_EXTENSIONS", "CODE_EXTENSIONS", "FORMATS", "BUCKETS", "SUBTYPES"]

FORMATS = ("dac", "npy")
BUCKETS = ("exact", "mask", "pad")  # how the encoder groups items into batches (module docstring)
SUBTYPES = {"pcm16": "PCM_16", "pcm24": "PCM_24", "float": "FLOAT"}


def encode_rows(model, rows: list, frames: list, hop: int, device, dtype, n_quantizers=None, masked=False,
                **encode_kwargs):
    """The model step of every encoder (files, Ray actors): zero-pad each item's rows (channels, samples) to
    the longest item's ``frames * hop``, encode all rows in one call, and return each item's codes
    (channels, n_codebooks, its own frames) as int64 numpy arrays. ``masked`` (for models that
    ``supports_padding_mask``): items of different frame counts get a padding mask, so each item's codes
    equal encoding it alone."""
    import torch

    n_rows = sum(r.shape[0] for r in rows)
    buf = torch.zeros(n_rows, 1, max(frames) * hop, dtype=torch.float32)
    i = 0
    for r in rows:
        c, n = r.shape
        buf[i:i + c, 0, :n] = torch.from_numpy(np.require(r, requirements="W"))  # Ray hands read-only arrays
        i += c
    x = _to_device(buf, device).to(dtype)
    if n_quantizers is not None:
        encode_kwargs["n_quantizers"] = n_quantizers
    if masked and len(set(frames)) > 1:
        # each row is real (its item's padded length, frames * hop) up to there, padding after
        lengths = torch.tensor([f * hop for r, f in zip(rows, frames) for _ in range(r.shape[0])])
        encode_kwargs["padding_mask"] = _to_device(torch.arange(buf.shape[-1]) < lengths[:, None], device)
    with torch.inference_mode():
        out = model.encode(x, return_dict=True, **encode_kwargs)
    codes = out.audio_codes if hasattr(out, "audio_codes") else out[1]
    if n_quantizers is not None:
        codes = codes[:, :n_quantizers]
    codes = codes.to("cpu", torch.int64).numpy()
    res, i = [], 0
    for r, f in zip(rows, frames):
        res.append(codes[i:i + r.shape[0], :, :f])
        i += r.shape[0]
    return res


def _as_numpy(t):
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _start(model, output_dir, n_quantizers, batch_size, workers, device, dtype, seed) -> tuple[JobModel, Path]:
    """The checks every run makes before any work (arguments, the model spec, the output directory)."""
    check_positive(batch_size=batch_size, workers=workers)
    resolved = JobModel(model, device=device, dtype=dtype, seed=seed, n_quantizers=n_quantizers)
    return resolved, prepare_output_dir(output_dir)


def _finish(report: Report, log: OutputLog, t0: float) -> Report:
    log.close()
    report.wall_seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------
def encode_files(
    inputs,
    output_dir,
    model: Any,
    *,
    batch_size: int = 8,
    n_quantizers: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    workers: int = 2,
    overwrite: bool = False,
    format: str = "dac",
    progress: bool | None = None,
    bucket: str = "exact",
    normalize_db: float | None = -16.0,
    tile_frames: int | None = None,
    prefetch_memory: float = 2 << 30,
    seed: int = 0,
) -> Report:
    """Encode audio files to ``.dac`` (or ``format="npy"``) files under ``output_dir``.

    ``inputs``: files, directories (searched recursively for audio extensions) and glob
    patterns. ``model``: a model object or a spec for :func:`load_model` (``seed`` for presets).
    ``batch_size`` counts rows (a stereo file is two rows). ``bucket``: "exact" (default), "mask" or
    "pad" (see the module docstring). ``normalize_db``: loudness target (None: no normalization).
    ``tile_frames``: passed to the model's encode (its exact tiling of long inputs).
    ``prefetch_memory``: about how many bytes of decoded audio may be loaded ahead of the model
    (at least one file always is). Existing outputs are trusted only as ``dac_fast.resume``
    describes. Returns a :class:`Report`; failures do not stop the run; mistakes in the arguments
    raise :class:`UserError` before the model is loaded.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise UserError(f"must be one of {FORMATS}, got {format!r}", "format")
    if bucket not in BUCKETS:
        raise UserError(f"must be one of {BUCKETS}, got {bucket!r}", "bucket")
    resolved, output_dir = _start(model, output_dir, n_quantizers, batch_size, workers, device, dtype, seed)
    report = Report(task="encode")
    expanded, report.failures = expand_inputs(inputs, AUDIO_EXTENSIONS)
    log = OutputLog(output_dir, resolved.setup("encode", n_quantizers=n_quantizers,
                                          # "mask" gives the codes of "exact": outputs of either are one setup
                                          normalize_db=normalize_db, bucket="exact" if bucket == "mask" else bucket))
    jobs = plan_jobs(expanded, lambda rel: encoded_output(output_dir, rel, format), log, codes_intact, overwrite, report)
    if not jobs:
        return _finish(report, log, t0)

    resolved.load()
    model, sr, hop = resolved.model, resolved.sample_rate, resolved.hop
    if bucket == "mask" and not supports_padding_mask(model):
        raise UserError("'mask' needs a model whose encode takes padding_mask (dac_fast's DacModel); "
                        "use 'exact' or 'pad'", "bucket")
    enc_kwargs = resolved.call_options("encode", tile_frames)

    def header(src):
        try:
            return aio.audio_info(src)
        except Exception:
            return None

    # each header read once (cheap): sort by duration so equal/similar lengths meet in the bucketer,
    # and size the prefetch window
    headers = {job[0]: header(job[0]) for job in jobs}
    jobs.sort(key=lambda job: (lambda h: h[2] / h[0] if h else 0.0)(headers[job[0]]))

    def size_fn(job):
        # float32 at the source rate and at the model rate, plus pyloudnorm's float64 working copies
        h = headers[job[0]]
        return h[1] * h[2] * 4 * (1 + 3 * max(1.0, sr / h[0])) if h else 0

    def load_fn(i, job):
        src, out = job
        audio, in_sr = aio.read_audio(src)
        channels, n = audio.shape
        x, input_db = aio.prepare_for_encoding(audio, in_sr, sr, normalize_db)
        frames = math.ceil(x.shape[-1] / hop)
        if frames == 0:
            raise aio.AudioError(src, "audio too short to encode")
        return _Item(i, src, out, rows=x, frames=frames,
                     meta=dict(input_db=input_db, sample_rate=in_sr, original_length=n, channels=channels,
                               duration=n / in_sr))

    def model_fn(batch: list[_Item]):
        return encode_rows(model, [it.rows for it in batch], [it.frames for it in batch], hop, resolved.device, resolved.dtype,
                           resolved.n_quantizers, masked=bucket == "mask", **enc_kwargs)

    def write_fn(it: _Item, codes):
        m = it.meta
        f = DacFile(codes=codes, input_db=np.array([m["input_db"]], np.float32), original_length=m["original_length"],
                    sample_rate=m["sample_rate"], chunk_length=codes.shape[-1], channels=m["channels"], padding=True)
        if format == "dac":
            f.save(it.out)
        else:
            f.extra = {"source": str(it.src), "model_sample_rate": sr, "hop_length": hop}
            f.save_npy(it.out.with_name(it.out.name[: -len(".json")]))
        return {"shape": list(f.codes.shape)}

    try:
        _run("encode", jobs, report, load_fn, model_fn, write_fn, batch_size=batch_size, workers=workers,
             exact=(bucket == "exact"), progress=_want_progress(progress), log=log, size_fn=size_fn,
             memory_budget=int(prefetch_memory))
    finally:
        _finish(report, log, t0)
    return report


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
def decode_files(
    inputs,
    output_dir,
    model: Any,
    *,
    batch_size: int = 8,
    n_quantizers: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    workers: int = 2,
    overwrite: bool = False,
    format: str = "wav",
    progress: bool | None = None,
    tile_frames: int | None = None,
    subtype: str = "pcm16",
    seed: int = 0,
) -> Report:
    """Decode ``.dac`` (or npy-format ``.json``) files to audio under ``output_dir``.

    Restores the original sample rate (soxr), length and channel count, and the loudness
    (each channel normalized back to the stored ``input_db``, as the original decompress).
    ``format`` is the audio extension (wav, flac, ogg); ``subtype`` the sample format of wav/flac
    outputs: "pcm16" (default, as the original), "pcm24" or "float" (wav only). Items are batched
    only with items of the same frame count, so batched decoding equals decoding each file alone.
    A file whose frame rate or codebook count does not fit the model fails (it was made by
    another model: decoding it would give noise).

    Files written by the original's chunked ``compress`` (``padding=False``, ``chunk_length``
    < frames) are decoded in one pass over all their frames, like our own whole-file codes;
    the original's ``decompress`` decodes such files chunk by chunk without convolution padding
    instead, so the audio near its chunk boundaries differs slightly (its boundary artefacts,
    upstream issue #39, are not reproduced). Length, rate, channels and loudness are restored
    the same way.
    """
    import torch

    t0 = time.perf_counter()
    fmt = format.lstrip(".").lower()
    if fmt in FORMATS:  # "dac"/"npy" are encode formats: the audio format defaults to wav
        fmt = "wav"
    if subtype not in SUBTYPES:
        raise UserError(f"must be one of {tuple(SUBTYPES)}, got {subtype!r}", "subtype")
    if subtype == "float" and fmt != "wav":
        raise UserError(f"'float' samples need --format wav, got {fmt!r}", "subtype")
    resolved, output_dir = _start(model, output_dir, n_quantizers, batch_size, workers, device, dtype, seed)
    report = Report(task="decode")
    expanded, report.failures = expand_inputs(inputs, CODE_EXTENSIONS)
    log = OutputLog(output_dir, resolved.setup("decode", n_quantizers=n_quantizers,
                                          subtype=subtype if fmt in ("wav", "flac") else None))
    jobs = plan_jobs(expanded, lambda rel: (output_dir / rel).with_suffix("." + fmt), log, audio_intact, overwrite, report)
    if not jobs:
        return _finish(report, log, t0)

    resolved.load()
    model, sr, hop, nq = resolved.model, resolved.sample_rate, resolved.hop, resolved.n_quantizers
    dec_kwargs = resolved.call_options("decode", tile_frames)
    sf_subtype = SUBTYPES[subtype] if fmt in ("wav", "flac") else None

    def load_fn(i, job):
        src, out = job
        f = load_any(src)
        f.check_fits_model(sr, hop, resolved.n_codebooks, resolved.codebook_size, name=str(src))
        codes = f.codes.astype(np.int64)
        if nq is not None:
            codes = codes[:, :nq]
        return _Item(i, src, out, rows=codes, frames=codes.shape[-1], shape_key=codes.shape[1],
                     meta=dict(f=f, duration=f.original_length / f.sample_rate))

    def model_fn(batch: list[_Item]):
        # exact bucketing: every item of a batch has the same frame and codebook counts
        codes = torch.from_numpy(np.concatenate([it.rows for it in batch], 0))
        with torch.inference_mode():
            out = model.decode(audio_codes=_to_device(codes, resolved.device), return_dict=True, **dec_kwargs)
        audio = out.audio_values if hasattr(out, "audio_values") else out[0]
        audio = _as_numpy(audio.reshape(audio.shape[0], -1))
        bounds = np.cumsum([0] + [it.rows.shape[0] for it in batch])
        return [audio[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]

    def write_fn(it: _Item, audio):
        f: DacFile = it.meta["f"]
        y = aio.restore_after_decoding(audio, sr, f.input_db, f.sample_rate, f.original_length, f.channels)
        aio.write_audio(it.out, y, f.sample_rate, subtype=sf_subtype)
        return {"channels": int(y.shape[0]), "frames": int(y.shape[1])}

    try:
        _run("decode", jobs, report, load_fn, model_fn, write_fn, batch_size=batch_size, workers=workers,
             exact=True, progress=_want_progress(progress), log=log)
    finally:
        _finish(report, log, t0)
    return report


def _want_progress(progress):
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def info(path) -> dict:
    """Metadata of a ``.dac`` / npy-format file, as a dict (for ``dac-fast info``).

    ``sample_rate`` is the rate of the audio that was encoded (restored by decoding), not the
    model's; the model's rate and frame rate are inferred from the frame count and duration (the
    file does not store them; npy-format files do) and the bitrate follows from them."""
    f = load_any(path)
    d = {
        "path": str(path), "dac_version": f.dac_version, "channels": f.channels,
        "n_codebooks": f.n_codebooks, "frames": f.frames, "chunk_length": f.chunk_length,
        "padding": f.padding, "sample_rate": f.sample_rate, "original_length": f.original_length,
        "duration_seconds": round(f.duration, 6), "input_db": [round(float(v), 3) for v in f.input_db],
        "codes_dtype": str(f.codes.dtype), "codes_shape": list(f.codes.shape),
        "code_range": [int(f.codes.min()), int(f.codes.max())] if f.codes.size else None,
    }
    msr, hop = f.extra.get("model_sample_rate"), f.extra.get("hop_length")
    source = "stored in the file"
    if msr is None or hop is None:
        msr, hop = _guess_model(f) or (None, None)
        source = "inferred from frames and duration"
    if msr and hop:
        frame_rate = msr / hop
        bits = math.log2(1024)  # every DAC codebook has 1024 entries
        d.update(model_sample_rate=int(msr), hop_length=int(hop), frame_rate=round(frame_rate, 3),
                 bitrate_kbps=round(f.n_codebooks * bits * frame_rate / 1000, 3), model_rates=source)
    else:
        d["model_rates"] = "unknown: the frame count fits none or several of the official models"
    return d


def _guess_model(f: DacFile) -> tuple[int, int] | None:
    """(model rate, hop) of the official models whose frame count fits the file, when one rate does."""
    fits = set()
    for name, cfg in PRESETS.items():
        hop = int(np.prod(cfg["downsampling_ratios"]))
        if f.n_codebooks <= cfg["n_codebooks"] and f.fits_frame_rate(cfg["sampling_rate"], hop):
            fits.add((cfg["sampling_rate"], hop))
    return fits.pop() if len(fits) == 1 else None
