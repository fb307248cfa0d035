"""The three Ray Data stages of a distributed encode: read (tasks), encode (actor pool), write (tasks).

Each stage is a picklable callable that Ray ships to its workers. Read tasks import only numpy-level
modules (dac_fast.io, soundfile, soxr, pyloudnorm): torch is imported by the encoder actors alone.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import io as aio
from ..planning import encoded_output
from ..dacfile import DacFile
from ..runner import run_with_fallback
from .schema import DAC_DIR, SHARDS_DIR, codes_from_row, pq, shard_table

# Fault injection, tests only; the variables are read in the workers, so set them before Ray starts.
CRASH_ENV = "DAC_FAST_TEST_CRASH_ON"  # read workers die on paths containing this value
# Encoder actors with TOKEN = $DAC_FAST_TEST_ENCODER_CRASH die on paths containing TOKEN_always,
# once per path on TOKEN_once (a TOKEN_once path gets a marker file PATH.crashed), hang on
# TOKEN_hang, and die while starting when the model spec contains TOKEN_init.
ENCODER_CRASH_ENV = "DAC_FAST_TEST_ENCODER_CRASH"
AUDIO_COLUMNS = ("audio", "bytes", "amplitude")  # accepted audio columns of a user Dataset, in this order


def _encoder_fault(text: str, kinds) -> str | None:
    token = os.environ.get(ENCODER_CRASH_ENV)
    if not token:
        return None
    return next((k for k in kinds if f"{token}_{k}" in text), None)


def _inject_encoder_faults(paths) -> None:
    for path in paths:
        kind = _encoder_fault(path, ("always", "once", "hang"))
        if kind == "hang":
            Path(path + ".hanging").touch()  # tests interrupt once the hang has begun, not after a guessed delay
            time.sleep(10**6)
        if kind == "once":
            marker = Path(path + ".crashed")
            if marker.exists():
                continue
            marker.touch()
        if kind is not None:
            os._exit(1)


# ----------------------------------------------------------------------------------------------
# stage 1: read + resample + loudness (CPU tasks)
# ----------------------------------------------------------------------------------------------
class Reader:
    """Row function: input row -> prepared audio at the model rate (or an error)."""

    def __init__(self, model_rate: int, hop: int, normalize_db, audio_column=None):
        self.sr, self.hop, self.normalize_db, self.audio_column = model_rate, hop, normalize_db, audio_column

    def __call__(self, row: dict) -> dict:
        path = str(row.get("path", ""))
        crash = os.environ.get(CRASH_ENV)
        if crash and crash in path:  # fault injection for tests: the worker process dies
            os._exit(1)
        out = {"path": path, "rel": str(row.get("rel") or ""), "audio": b"", "channels": 0, "samples": 0,
               "sample_rate": 0, "original_length": 0, "input_db": 0.0, "frames": 0, "error": ""}
        try:
            audio, in_sr = self._load(row, path)
            channels, n = audio.shape
            x, input_db = aio.prepare_for_encoding(audio, in_sr, self.sr, self.normalize_db)
            frames = math.ceil(x.shape[-1] / self.hop)
            if frames == 0:
                raise aio.AudioError(path, "audio too short to encode")
            out.update(audio=np.ascontiguousarray(x, dtype="<f4").tobytes(), channels=int(channels),
                       samples=int(x.shape[-1]), sample_rate=int(in_sr), original_length=int(n),
                       input_db=float(input_db), frames=int(frames))
        except aio.AudioError as exc:
            out["error"] = exc.reason
        except Exception as exc:  # never let one input fail the block: it goes to the errors table
            out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def _load(self, row: dict, path: str):
        col = self.audio_column or next((c for c in AUDIO_COLUMNS if c in row), None)
        if col is None:  # paths mode: read the file from the shared filesystem
            return aio.read_audio(path)
        value = row[col]
        if isinstance(value, (bytes, bytearray, memoryview)):  # encoded file bytes (read_binary_files)
            suffix = Path(path).suffix if Path(path).suffix else ".audio"
            with tempfile.TemporaryDirectory(prefix="dacfast-ray-") as d:
                tmp = Path(d) / ("input" + suffix)
                tmp.write_bytes(bytes(value))
                try:
                    return aio.read_audio(tmp)
                except aio.AudioError as exc:
                    raise aio.AudioError(path, exc.reason) from None
        # decoded samples: (channels, samples) or (samples,) plus a sample_rate column
        if "sample_rate" not in row:
            raise aio.AudioError(path, f"column {col!r} holds samples but the dataset has no 'sample_rate' column")
        audio = np.asarray(value, dtype=np.float32)
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2 or audio.size == 0:
            raise aio.AudioError(path, f"audio array has shape {audio.shape}; expected (channels, samples)")
        if not np.isfinite(audio).all():
            raise aio.AudioError(path, f"audio contains {int((~np.isfinite(audio)).sum())} NaN/Inf samples")
        return np.ascontiguousarray(audio), int(row["sample_rate"])


# ----------------------------------------------------------------------------------------------
# stage 2: encode (actor pool; the model is loaded once per actor)
# ----------------------------------------------------------------------------------------------
class AttemptLedger:
    """One small actor per run (driver-owned, no CPU): how often each batch, and each encoder actor's
    constructor, was started without finishing, across actor restarts; and the encoder actors.

    Ray restarts a dead encoder actor and re-submits every task that was queued on it; only the
    batch that was running when it died counts an attempt here, so a poison input costs its own
    batch (after ``max_task_retries`` retries), never the batches queued behind it. Ray restarts
    an actor whose process dies in its constructor without limit too: the constructor counts its
    own attempts here and gives up with an exception, which stops the job."""

    def __init__(self):
        self.unfinished: dict[str, int] = {}
        self.actors: dict[str, object] = {}

    def start(self, key: str) -> int:
        self.unfinished[key] = self.unfinished.get(key, 0) + 1
        return self.unfinished[key]

    def finish(self, key: str) -> None:
        self.unfinished.pop(key, None)

    def register(self, actor_id: str, handle) -> None:
        self.actors[actor_id] = handle

    def actor_handles(self) -> list:
        return list(self.actors.values())


def batch_key(paths) -> str:
    return hashlib.sha1("\0".join(sorted(str(p) for p in paths)).encode()).hexdigest()


class Encoder:
    """Batch function of the encoder actor pool: prepared audio -> codes (or an error per input)."""

    def __init__(self, model, device=None, dtype=None, seed=0, n_quantizers=None, tile_frames=None, threads=None,
                 ledger=None, max_task_retries=3):
        self.ledger, self.max_attempts = ledger, 1 + int(max_task_retries)
        constructor_key = self._start_constructor()
        if _encoder_fault(str(model), ("init",)):
            os._exit(1)
        import torch

        from ..job_model import JobModel
        from ..runtime import tune_allocator

        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda"):
            # exact parity with the fp32 reference: TF32 changes conv/matmul results
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        else:
            tune_allocator()  # glibc mallopt: large CPU temporaries stop page-faulting
        job = JobModel(model, device=device, dtype=dtype, seed=seed, n_quantizers=n_quantizers, quiet=True).load()
        self.model, self.device, self.dtype = job.model, job.device, job.dtype
        self.sr, self.hop, self.nq = job.sample_rate, job.hop, job.n_quantizers
        self.kw = job.call_options("encode", tile_frames)
        self._ledger_call("finish", constructor_key)

    def _start_constructor(self) -> str | None:
        """Register this actor with the ledger; raise when its constructor already died
        ``max_task_retries + 1`` times in a row (e.g. the process is killed loading the model)."""
        if self.ledger is None:
            return None
        import ray

        ctx = ray.get_runtime_context()
        actor_id = ctx.get_actor_id()
        ray.get(self.ledger.register.remote(actor_id, ctx.current_actor))
        key = f"constructor of {actor_id}"
        attempt = self._ledger_call("start", key)
        if attempt > self.max_attempts:
            raise RuntimeError(f"an encoder actor's process died {attempt - 1} times while starting (loading the "
                               "model); see the Ray worker logs")
        return key

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        errors = [str(e) for e in batch["error"]]
        codes, n_codebooks, seconds = [b""] * n, [0] * n, [0.0] * n
        key = batch_key(batch["path"])
        attempt = self._ledger_call("start", key) or 1
        if attempt > self.max_attempts:  # its earlier attempts killed the worker: give it up
            deaths = attempt - 1
            reason = (f"lost: its encoder worker died on it {deaths} time{'s' * (deaths != 1)} (a crash on this "
                      "input?); re-run to retry")
            errors = [e or reason for e in errors]
        else:
            _inject_encoder_faults(str(p) for p in batch["path"])
            groups: dict[int, list[int]] = {}  # items of one frame count are encoded together (exact codes)
            for i in range(n):
                if not errors[i]:
                    groups.setdefault(int(batch["frames"][i]), []).append(i)
            for frames, idx in groups.items():
                t = time.perf_counter()
                def failed(i, exc):
                    errors[i] = f"model failed: {type(exc).__name__}: {exc}"[:500]

                for i, res in run_with_fallback(lambda items, f=frames: self._encode(batch, items, f), idx, failed):
                    codes[i] = np.ascontiguousarray(res.astype("<u2")).tobytes()
                    n_codebooks[i] = int(res.shape[1])
                for i in idx:
                    seconds[i] = (time.perf_counter() - t) / len(idx)
            self._ledger_call("finish", key)
        out = {k: batch[k] for k in ("path", "rel", "channels", "sample_rate", "original_length", "input_db", "frames")}
        out["n_codebooks"] = np.asarray(n_codebooks, dtype=np.int32)
        out["codes"] = np.array(codes, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["encode_seconds"] = np.asarray(seconds, dtype=np.float64)
        return out

    def _encode(self, batch: dict, idx: list[int], frames: int) -> list[np.ndarray]:
        """encode_files' model step (dac_fast.batch.encode_rows) on items of one frame count."""
        from ..batch import encode_rows

        rows = [np.frombuffer(batch["audio"][i], dtype="<f4").reshape(int(batch["channels"][i]), int(batch["samples"][i]))
                for i in idx]
        return encode_rows(self.model, rows, [frames] * len(rows), self.hop, self.device, self.dtype, self.nq,
                           **self.kw)

    def _ledger_call(self, method: str, key: str | None):
        if self.ledger is None or key is None:
            return None
        import ray

        return ray.get(getattr(self.ledger, method).remote(key))


# ----------------------------------------------------------------------------------------------
# stage 3: write shards (+ .dac files) (CPU tasks); only status rows go back to the driver
# ----------------------------------------------------------------------------------------------
class Writer:
    def __init__(self, output: str, write_dac: bool):
        self.output, self.write_dac = Path(output), write_dac

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        errors = [str(e) for e in batch["error"]]
        if self.write_dac:
            for i in range(n):
                if not errors[i]:
                    errors[i] = self._write_dac(batch, i)
        ok = [i for i in range(n) if not errors[i]]
        shard = ""
        if ok:
            # named by its content: a retried write task replaces its own shard instead of adding a duplicate
            shard = f"part-{batch_key(batch['path'][i] for i in ok)[:24]}.parquet"
            table = shard_table([{
                "path": str(batch["path"][i]), "sample_rate": int(batch["sample_rate"][i]),
                "original_length": int(batch["original_length"][i]), "channels": int(batch["channels"][i]),
                "n_codebooks": int(batch["n_codebooks"][i]), "frames": int(batch["frames"][i]),
                "codes": bytes(batch["codes"][i]), "input_db": [float(batch["input_db"][i])],
            } for i in ok])
            try:
                with aio.atomic_path(self.output / SHARDS_DIR / shard) as tmp:
                    pq.write_table(table, str(tmp))
            except Exception as exc:
                for i in ok:
                    errors[i] = f"shard write failed: {type(exc).__name__}: {exc}"[:500]
                shard = ""
        return {
            "path": np.array([str(p) for p in batch["path"]], dtype=object),
            "error": np.array(errors, dtype=object),
            "shard": np.array([shard if not errors[i] else "" for i in range(n)], dtype=object),
            "duration": np.asarray(batch["original_length"], dtype=np.float64)
            / np.maximum(np.asarray(batch["sample_rate"], dtype=np.float64), 1.0),
            "encode_seconds": np.asarray(batch["encode_seconds"], dtype=np.float64),
        }

    def _write_dac(self, batch: dict, i: int) -> str:
        """Write one input's .dac file; returns "" or the error. A file already at its path is kept when it holds
        exactly these bytes (this job's own, written before a crash lost its shard) and is never replaced
        otherwise: it is not ours (the Ray path has no --overwrite)."""
        try:
            c = int(batch["channels"][i])
            codes = codes_from_row({k: batch[k][i] for k in ("codes", "channels", "n_codebooks", "frames")})
            f = DacFile(codes=codes, input_db=np.array([batch["input_db"][i]], np.float32),
                        original_length=int(batch["original_length"][i]), sample_rate=int(batch["sample_rate"][i]),
                        chunk_length=codes.shape[-1], channels=c, padding=True)
            path = encoded_output(self.output / DAC_DIR, Path(str(batch["rel"][i])), "dac")
            if path.exists():
                if path.read_bytes() == f.to_bytes():
                    return ""
                return f"{path} exists and dac-fast did not write it; not replaced: use another output directory"
            f.save(path)
            return ""
        except OSError as exc:
            return f"write failed: {aio.os_reason(exc)} ({exc.filename or ''})"[:500]
        except Exception as exc:
            return f"write failed: {type(exc).__name__}: {exc}"[:500]
