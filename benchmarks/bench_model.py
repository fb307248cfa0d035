"""Model benchmark: dac_fast.DacModel against transformers' DacModel on the same weights and inputs.

    .venv/bin/python benchmarks/bench_model.py --quick --allocator tuned      # 44khz, B 1/4, 5 s, + 60 s memory check
    .venv/bin/python benchmarks/bench_model.py --quick --allocator default
    .venv/bin/python benchmarks/bench_model.py --presets 44khz --ops encode decode forward \\
        --batch-sizes 1 4 16 --seconds 5 30 --compile            # the issue's full grid (long on 2 CPU cores)
    .venv/bin/python benchmarks/bench_model.py --device cuda --batch-sizes 16 --seconds 10 --dtypes fp32 bf16 --compile

What is measured, per case (preset x op x batch x seconds) and side:
  * sides: ``ours`` (dac_fast, one column per --dtypes entry), ``hf`` (transformers eager, fp32) and, with
    --compile, ``hf-compile`` (transformers under torch.compile; the first call's time is reported separately
    as compile time). Weights: ``transformers.DacModel(DacConfig(<fields of dac_fast's preset>))`` filled by
    ``dac_fast.loading.randomize_`` (seeded), converted with ``dac_fast.DacModel.from_transformers``.
  * inputs: non-trivial audio at the model rate (speech-like pulse trains through formants, a chord, drum
    bursts; a different clip per batch item), its length rounded up to a whole number of hops as the feature
    extractor pads it. ``decode`` runs from ``quantized_representation`` (dac_fast's encoding of that audio);
    ``forward`` is encode + decode from the audio.
  * time: torch.inference_mode, --warmup calls then --repeats timed calls, median (CUDA synchronized);
    real-time factor = audio seconds processed (batch x seconds) / wall seconds; speedup = hf time / ours.
  * memory: every side runs in its own freshly spawned process (multiprocessing "spawn": no allocator state
    or cache carried from another side; --isolation case runs all sides of a case in one process, --isolation
    warm all cases of a side in one process, its model built once). CPU: peak RSS growth of one call above the RSS after model and input
    load (Linux VmHWM, reset through /proc/self/clear_refs; ru_maxrss if that is unavailable). CUDA:
    torch.cuda.max_memory_allocated growth. Measured on one extra untimed call after the timed ones (warm: no
    one-time initialisation or compilation in it; freed heap memory is trimmed before it).
  * agreement against transformers eager fp32: fraction of audio_codes equal (encode, forward) and SNR in dB of
    audio_values (decode, forward).
  * allocator: --allocator tuned calls glibc ``mallopt(M_MMAP_MAX=0)`` and ``mallopt(M_TRIM_THRESHOLD=2**31-1)``
    at the start of every measuring process, before torch is imported; ``default`` leaves glibc alone. All sides
    of one run use the same setting, which is stated in every output.
  * CUDA: fp32 with TF32 off unless --tf32; --dtypes bf16/fp16 apply to ours only (transformers stays fp32).
    --cuda-graphs-batches B...: cases of those batch sizes also get the side ``ours-fp32-graphs`` (ours in
    fp32 with ``cuda_graphs=True`` in encode and decode; its graphs are captured in the warm-up calls).

Output (under --out, file names tagged with device and allocator unless --tag): a markdown table (also
printed), a JSON file with all numbers, machine info and the command line, and a PNG chart (matplotlib; the
chart is skipped with a message if it is not installed).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = ("16khz", "24khz", "44khz")
OPS = ("encode", "decode", "forward")
DTYPES = ("fp32", "bf16", "fp16")
ISOLATION = {"side": "each side of each case in a fresh multiprocessing spawn child",
             "case": "all sides of a case in one fresh spawn child, in table order",
             "warm": "one fresh spawn child per side for all its cases (model built once), in table order"}


# ----------------------------------------------------------------------------- process setup (no torch here)
def tune_allocator(kind: str) -> str:
    """Apply the allocator setting in this process; returns a description. Call before importing torch."""
    from dac_fast.runtime import allocator_setting

    return allocator_setting(kind)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemMeter:
    """Peak memory growth of a region: CUDA allocator peak, or the process's peak RSS (VmHWM)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the call"
        else:
            _malloc_trim()
            self.hwm_ok = _reset_hwm() and _proc_status_kb("VmHWM") is not None
            if self.hwm_ok:
                self.base = _proc_status_kb("VmRSS") * 1024
                self.method = "peak RSS (VmHWM after clear_refs) - RSS before the call"
            else:
                import resource

                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.method = "ru_maxrss growth (a lower bound: earlier peaks hide growth below them)"
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.hwm_ok:
            self.peak = _proc_status_kb("VmHWM") * 1024 - self.base
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return False


# ----------------------------------------------------------------------------- models and inputs
def build_models(preset: str, seed: int, device: str, want_ours: bool, want_hf: bool):
    """transformers' model with dac_fast's seeded random weights, and dac_fast's conversion of it."""
    import transformers

    from dac_fast import DacConfig, DacModel
    from dac_fast.loading import randomize_

    cfg = DacConfig.from_preset(preset)
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")}
    hf = transformers.DacModel(transformers.DacConfig(**fields))
    randomize_(hf, seed)
    hf.eval()
    ours = DacModel.from_transformers(hf).to(device).eval() if want_ours else None
    hf = hf.to(device) if want_hf else None
    return hf, ours, cfg


def make_audio(sr: int, seconds: float, batch: int, hop: int, seed: int = 0):
    """(batch, 1, T) float32 numpy: a different non-trivial clip per batch item, T a multiple of hop.

    The speech-like part needs scipy (formant filters); without it (as on the lent GPU machine) a noise-excited
    chord stands in for it, and machine_info's ``audio`` field says which was used."""
    import numpy as np

    from dac_fast.demo import chord, drum, speech_like

    if not _has_scipy():
        def speech_like(sr, secs, seed):  # noqa: F811 - numpy-only stand-in, same level and length
            rng = np.random.default_rng(seed)
            n = int(sr * secs)
            return 0.5 * chord(sr, secs, root=150, seed=seed) + 0.05 * rng.standard_normal(n)

    n = int(math.ceil(seconds * sr / hop)) * hop
    secs = n / sr
    out = np.zeros((batch, 1, n), dtype=np.float32)
    for b in range(batch):
        s = seed * 1000 + b
        x = 0.6 * speech_like(sr, secs, seed=s) + 0.3 * chord(sr, secs, root=110 * (1 + b % 5), seed=s)
        x = x + 0.2 * drum(sr, secs, seed=s)
        x = np.asarray(x, dtype=np.float64)[:n]
        x = np.pad(x, (0, n - x.size))
        out[b, 0] = (0.7 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)
    return out


def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


def prep_inputs(job: dict) -> dict:
    """Child: write the audio and (for decode) dac_fast's quantized representation of it to job['dir']."""
    tune_allocator(job["allocator"])
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    device = job["device"]
    from dac_fast import DacConfig

    cfg = DacConfig.from_preset(job["preset"])
    audio = make_audio(cfg.sampling_rate, job["seconds"], job["batch"], cfg.hop_length, job["seed"])
    np.save(os.path.join(job["dir"], "audio.npy"), audio)
    if job["need_latent"]:
        _, ours, _ = build_models(job["preset"], job["seed"], device, True, False)
        with torch.inference_mode():
            q = ours.encode(torch.from_numpy(audio).to(device)).quantized_representation
        np.save(os.path.join(job["dir"], "latent.npy"), q.float().cpu().numpy())
    return {"samples": audio.shape[-1]}


# ----------------------------------------------------------------------------- one side of one case
def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


_SIDE_MODEL: dict = {}  # (preset, seed, device, side) -> (model, dtype): a warm process builds its side's once


def _side_model(job: dict):
    """The model of ``job``'s side (transformers, or ours in the side's dtype) and its input dtype."""
    import torch

    key = (job["preset"], job["seed"], job["device"], job["side"])
    if key not in _SIDE_MODEL:
        _SIDE_MODEL.clear()  # one side's model at a time (--isolation case runs several sides in one process)
        is_ours = job["side"].startswith("ours")
        hf, ours, _ = build_models(job["preset"], job["seed"], job["device"], is_ours, not is_ours)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[job.get("dtype", "fp32")]
        _SIDE_MODEL[key] = (ours.to(dtype), dtype) if is_ours else (hf, dtype)
    return _SIDE_MODEL[key]


def run_side(job: dict) -> dict:
    """Child: time one side of one case. Returns the numbers; outputs go to job['dir']."""
    allocator = tune_allocator(job["allocator"])
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    device, side, op = job["device"], job["side"], job["op"]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = job["tf32"]
        torch.backends.cudnn.allow_tf32 = job["tf32"]
    t0 = time.perf_counter()
    model, dtype = _side_model(job)
    gc.collect()
    _malloc_trim()
    load_s = time.perf_counter() - t0
    if job["warmup"] + job["repeats"] < 1:
        raise ValueError("need at least one call (warmup + repeats >= 1)")

    name = "latent.npy" if op == "decode" else "audio.npy"
    arg = torch.from_numpy(np.load(os.path.join(job["dir"], name))).to(device, dtype)

    if side.endswith("-graphs"):
        fn = _graphed_call(model, op)
    elif op == "encode":
        fn = model.encode
    elif op == "decode":
        fn = model.decode
    else:
        fn = model.forward
    compiled = side == "hf-compile"
    if compiled:
        fn = torch.compile(fn)

    def call():
        out = fn(arg)
        _sync(device)
        return out

    res = {"load_s": load_s, "allocator": allocator}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = []
    with torch.inference_mode():
        out = None
        for _ in range(job["warmup"] + job["repeats"]):
            del out
            t = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t)
        res["first_call_s"] = times[0]
        if compiled:
            res["compile_s"] = times[0]
        times = times[job["warmup"]:]
        # Memory: one more (warm, untimed) call, measured from the RSS / CUDA allocation before it.
        del out
        with MemMeter(device) as mem:
            out = call()
        res["peak_mem_bytes"], res["mem_method"] = mem.peak, mem.method
    res["times_s"] = times
    if load_before is not None:  # 1-minute load average around this side's calls: > threads means contention
        res["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    res["median_s"] = statistics.median(times) if times else res["first_call_s"]
    res["timed_from"] = "repeats" if times else "first call (no repeats)"
    if op in ("encode", "forward"):
        np.save(os.path.join(job["dir"], f"codes_{side}.npy"), out.audio_codes.cpu().numpy().astype(np.int16))
    if op in ("decode", "forward"):
        np.save(os.path.join(job["dir"], f"audio_{side}.npy"), out.audio_values.float().cpu().numpy())
    return res


def _graphed_call(model, op: str):
    """ours' encode, decode or forward (encode then decode) with cuda_graphs=True."""
    from dac_fast.outputs import DacOutput

    if op == "encode":
        return lambda x: model.encode(x, cuda_graphs=True)
    if op == "decode":
        return lambda z: model.decode(z, cuda_graphs=True)

    def forward(x):
        enc = model.encode(x, cuda_graphs=True)
        audio = model.decode(enc.quantized_representation, cuda_graphs=True).audio_values[..., : x.shape[-1]]
        return DacOutput(enc.loss, audio, enc.quantized_representation, enc.audio_codes, enc.projected_latents)

    return forward


def _child(target, job, conn):
    try:
        conn.send(("ok", target(job)))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _child_each(target, jobs, conn):
    try:
        for job in jobs:
            try:
                conn.send(("ok", target(job)))
            except Exception as e:  # noqa: BLE001 - that job's failure; the next ones still run
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _spawn(child, target, arg):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child, args=(target, arg, send))
    p.start()
    send.close()
    return p, recv


def _receive(p, recv, timeout):
    """The child's next message, or ("error", why) when it timed out (it is killed) or died."""
    try:
        if not recv.poll(timeout):
            p.kill()
            return "error", f"child timed out after {timeout} s"
        return recv.recv()
    except EOFError:
        return "error", "child died without a result (killed for memory?)"


def in_child_each(target, jobs: list[dict], timeout: float | None = None):
    """Yields target(job)'s ("ok", result) or ("error", message) for each job, all run in one fresh process
    (warm: CUDA context, imports and compiled kernels carried from job to job), each as soon as it is done;
    ``timeout`` per job."""
    p, recv = _spawn(_child_each, target, jobs)
    for i in range(len(jobs)):
        status, payload = _receive(p, recv, timeout)
        yield status, payload
        if status == "error":
            p.join(1)  # a child that timed out (killed) or died has exited by now; a failed job's goes on
            if not p.is_alive():
                for _ in jobs[i + 1 :]:
                    yield "error", f"not run: the process ended ({payload.splitlines()[0]})"
                return
    p.join()


def in_child(target, job, timeout: float | None = None):
    p, recv = _spawn(_child, target, job)
    status, payload = _receive(p, recv, timeout)
    p.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


# ----------------------------------------------------------------------------- reporting
def machine_info(device: str, threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "libc": " ".join(platform.libc_ver()),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "audio": "speech-like + chord + drums" if _has_scipy() else "noisy chord + chord + drums (no scipy)",
    }
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from dac_fast import ops

        info["dac_fast_backend"] = os.environ.get("DAC_FAST_BACKEND", "auto")
        status = getattr(ops, "extension_status", None)
        info["dac_fast_extension"] = status() if status else bool(getattr(ops, "_C", None))
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _snr_db(ref, x) -> float:
    import numpy as np

    n = min(ref.shape[-1], x.shape[-1])
    ref, x = ref[..., :n].astype(np.float64), x[..., :n].astype(np.float64)
    err = float(np.sum((ref - x) ** 2))
    sig = float(np.sum(ref**2))
    return float("inf") if err == 0 else 10 * math.log10(sig / err)


def agreement(d: str, side: str, ref: str = "hf") -> dict:
    import numpy as np

    out = {}
    c_ref, c = os.path.join(d, f"codes_{ref}.npy"), os.path.join(d, f"codes_{side}.npy")
    if os.path.exists(c_ref) and os.path.exists(c):
        a, b = np.load(c_ref), np.load(c)
        out["code_agreement"] = float((a == b).mean()) if a.shape == b.shape else 0.0
    a_ref, a = os.path.join(d, f"audio_{ref}.npy"), os.path.join(d, f"audio_{side}.npy")
    if os.path.exists(a_ref) and os.path.exists(a):
        out["audio_snr_db"] = _snr_db(np.load(a_ref), np.load(a))
    return out


def _fmt_mem(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def markdown(records: list[dict], info: dict) -> str:
    lines = [
        f"# dac_fast vs transformers DacModel ({info['device']}, {info['allocator']})",
        "",
        f"- date: {info['date']}; command: `{info['command']}`",
        f"- machine: {info.get('gpu') or info['cpu_model']}; cores {info['cpu_cores']}; threads {info['threads']}; "
        f"torch {info['torch']}; transformers {info['transformers']}; commit {info.get('git_commit', '?')[:10]}"
        + (f"; load average {info['loadavg_start'][0]:.1f} at start, {info['loadavg_end'][0]:.1f} at end"
           if info.get("loadavg_start") and info.get("loadavg_end") else ""),
        f"- allocator: {info['allocator']} (same for every side); isolation: {info['isolation']}",
        "- CPU timings are only comparable when the machine is otherwise idle: each record's JSON has the 1-minute "
        "load average before and after its calls (`loadavg_1min`)",
        f"- weights: seeded random (dac_fast.loading.randomize_, seed {info['seed']}), identical on both sides; "
        f"timings: median of {info['repeats']} after {info['warmup']} warm-up call(s)"
        + ("; TF32 on" if info.get("tf32") else ("; TF32 off" if info["device"] == "cuda" else "")),
        "- RTF = audio seconds / wall seconds (higher is faster); speedup = transformers eager time / ours; "
        "peak mem = growth during one call (MiB); codes = fraction of audio_codes equal to transformers eager; "
        "SNR = audio_values vs transformers eager (dB)",
        "",
        "| preset | op | batch | seconds | side | median s | RTF | speedup vs hf | vs hf-compile | first call s | "
        "peak mem MiB | mem vs hf | codes equal | SNR dB |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['op']} | {r['batch']} | {r['seconds']:g} | {r['side']} | "
                         f"error: {r['error'].splitlines()[0][:80]} | | | | | | | | |")
            continue
        sp = r.get("speedup_vs_hf")
        spc = r.get("speedup_vs_hf_compile")
        ca = r.get("code_agreement")
        snr = r.get("audio_snr_db")
        first = f"{r['first_call_s']:.2f}" + (" (compile)" if r.get("compile_s") is not None else "")
        mr = r.get("mem_ratio_vs_hf")
        note = " (memory check)" if r.get("purpose") == "memory" else ""
        lines.append(
            f"| {r['preset']} | {r['op']}{note} | {r['batch']} | {r['seconds']:g} | {r['side']} | {r['median_s']:.3f} | "
            f"{r['rtf']:.2f} | {'-' if sp is None else f'{sp:.2f}x'} | {'-' if spc is None else f'{spc:.2f}x'} | "
            f"{first} | {_fmt_mem(r.get('peak_mem_bytes'))} | {'-' if mr is None else f'{mr:.2f}x'} | "
            f"{'-' if ca is None else f'{100 * ca:.2f}%'} | "
            f"{'-' if snr is None else ('inf' if math.isinf(snr) else f'{snr:.1f}')} |"
        )
    return "\n".join(lines) + "\n"


def chart(records: list[dict], info: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: chart skipped (.venv/bin/pip install matplotlib)"
    ok = [r for r in records if "error" not in r]
    cases = []
    for r in ok:
        key = (r["preset"], r["op"], r["batch"], r["seconds"])
        if key not in cases:
            cases.append(key)
    sides = []
    for r in ok:
        if r["side"] not in sides:
            sides.append(r["side"])
    if not cases:
        return "no results: chart skipped"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(cases) * max(1, len(sides)) / 2), 8))
    width = 0.8 / len(sides)
    for i, s in enumerate(sides):
        rtf, mem = [], []
        for c in cases:
            r = next((r for r in ok if (r["preset"], r["op"], r["batch"], r["seconds"]) == c and r["side"] == s), None)
            rtf.append(r["rtf"] if r else 0)
            mem.append((r.get("peak_mem_bytes") or 0) / 2**20 if r else 0)
        xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(cases))]
        ax1.bar(xs, rtf, width, label=s)
        ax2.bar(xs, mem, width, label=s)
    labels = [f"{p}\n{o} B{b} {s:g}s" for p, o, b, s in cases]
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
    ax1.set_ylabel("real-time factor (higher is faster)")
    ax2.set_ylabel("peak memory growth (MiB)")
    ax1.set_title(f"dac_fast vs transformers DacModel: {info['device']}, {info.get('gpu') or info['cpu_model']}, "
                  f"{info['threads']} threads\n{info['allocator']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seconds", nargs="+", type=float, default=[5.0, 30.0])
    p.add_argument("--quick", action="store_true",
                   help="44khz, batch 1 and 4, 5 s, encode + decode, plus a 60 s batch-1 decode memory check "
                        "(overrides --presets/--ops/--batch-sizes/--seconds)")
    p.add_argument("--memory-check-seconds", type=float, default=60.0,
                   help="length of the --quick decode memory check (0 disables)")
    p.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32"], help="dtypes of ours (hf is fp32)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="shorthand: add this dtype to --dtypes")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (off by default)")
    p.add_argument("--compile", action="store_true", help="also time transformers under torch.compile")
    p.add_argument("--compile-batches", nargs="*", type=int, default=[],
                   help="with --compile: only cases of these batch sizes get the torch.compile side (each compile "
                        "costs a minute or more from a cold cache)")
    p.add_argument("--cuda-graphs-batches", nargs="*", type=int, default=[],
                   help="batch sizes whose cases also time ours fp32 with cuda_graphs=True (CUDA only)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers (ours only; no agreement)")
    p.add_argument("--isolation", choices=["side", "case", "warm"], default="side",
                   help="side: each side of each case in its own fresh process (default; no allocator state "
                        "carried over); case: all sides of a case in one process, transformers first; warm: "
                        "one process per side for all its cases (its model built once, torch.compile's "
                        "and CUDA's start paid once per side), each case's row written as it finishes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measuring process")
    p.add_argument("--out", default=str(ROOT / "out" / "bench_model"), help="output directory")
    p.add_argument("--tag", default=None, help="output file name tag (default: <device>_<allocator>)")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.dtype and args.dtype not in args.dtypes:
        args.dtypes.append(args.dtype)
    args.warmup = max(args.warmup, 1 if args.compile else 0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The parent only orchestrates; it applies the setting too so that it is stated from one place.
    allocator = tune_allocator(args.allocator)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())

    cases = []  # (preset, op, batch, seconds, warmup, repeats, purpose)
    if args.quick:
        for b in (1, 4):
            for op in ("encode", "decode"):
                cases.append(("44khz", op, b, 5.0, args.warmup, args.repeats, "speed"))
        if args.memory_check_seconds > 0:
            cases.append(("44khz", "decode", 1, args.memory_check_seconds, 0, 1, "memory"))
    else:
        for preset in args.presets:
            for seconds in args.seconds:
                for b in args.batch_sizes:
                    for op in args.ops:
                        cases.append((preset, op, b, seconds, args.warmup, args.repeats, "speed"))

    sides = [f"ours-{d}" if (len(args.dtypes) > 1 or d != "fp32") else "ours" for d in args.dtypes]
    ref_sides = [] if args.no_reference else ["hf"]
    # transformers eager first (the reference of every comparison), torch.compile last (the slowest to set up:
    # a run cut short loses the least)
    compile_sides = ["hf-compile"] if args.compile and not args.no_reference else []
    if args.cuda_graphs_batches and device != "cuda":
        print("--cuda-graphs-batches needs --device cuda", file=sys.stderr)
        return 2
    info = machine_info(device, threads)
    info.update(allocator=allocator, allocator_setting=args.allocator, seed=args.seed, warmup=args.warmup,
                repeats=args.repeats, tf32=args.tf32 if device == "cuda" else None, dtypes=args.dtypes,
                isolation=ISOLATION[args.isolation])
    print(f"# device {device}, {threads} threads, {allocator}; {len(cases)} cases x sides "
          f"{ref_sides + sides + compile_sides}",
          flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{device}_{args.allocator}" + ("_quick" if args.quick else "")
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        jobs, case_recs = plan_jobs(cases, args, device, threads, tmp, ref_sides, sides, compile_sides)
        for job, (status, payload) in run_jobs(jobs, args.isolation, args.timeout):
            rec = case_recs[job["case"]][job["side"]]
            if status == "ok":
                rec.update(payload)
                rec["rtf"] = job["batch"] * rec["audio_seconds"] / rec["median_s"]
            else:
                rec["error"] = payload
            records.append(rec)
            _compare_sides(case_recs[job["case"]], job["dir"])
            _print_side(rec)
            # rewritten after every side: a run cut short still leaves what it measured
            write_outputs(records, info, out, tag, args)

    if hasattr(os, "getloadavg"):
        # A busy machine slows every side: compare loadavg with the thread count before trusting CPU numbers.
        info["loadavg_end"] = os.getloadavg()
    md = write_outputs(records, info, out, tag, args)
    print()
    print(md)
    msg = chart(records, info, out / f"bench_model_{tag}.png")
    print(msg or f"chart: {out / f'bench_model_{tag}.png'}")
    print(f"wrote {out / f'bench_model_{tag}.md'} and .json")
    return 1 if any("error" in r for r in records) else 0


def plan_jobs(cases, args, device, threads, tmp, ref_sides, sides, compile_sides):
    """Inputs written for every case (one child), then one job per (case, side) in table order, and the
    records they fill: ({case: {side: record}})."""
    bases = []
    for ci, (preset, op, batch, seconds, warmup, repeats, purpose) in enumerate(cases):
        d = os.path.join(tmp, f"case{ci}")
        os.makedirs(d)
        bases.append(dict(preset=preset, op=op, batch=batch, seconds=seconds, seed=args.seed, device=device,
                          threads=threads, allocator=args.allocator, dir=d, tf32=args.tf32, case=ci,
                          need_latent=op == "decode"))
    prepared = list(in_child_each(prep_inputs, bases, args.timeout))  # every case's inputs in one child
    jobs, case_recs = [], {}
    for base, (preset, op, batch, seconds, warmup, repeats, purpose), (status, prep) in zip(bases, cases, prepared):
        if status != "ok":
            print(f"  prep failed for {preset} {op} B{batch} {seconds}s: {prep}", flush=True)
            continue
        audio_s = prep["samples"] / _sampling_rate(preset)
        graph_sides = ["ours-fp32-graphs"] if batch in args.cuda_graphs_batches else []
        compiled = compile_sides if not args.compile_batches or batch in args.compile_batches else []
        recs = case_recs[base["case"]] = {}
        for side in ref_sides + sides + graph_sides + compiled:
            dtype = side.split("-")[1] if side.startswith("ours-") else "fp32"
            w = max(warmup, 1) if side == "hf-compile" else warmup  # the compiling call is never timed
            jobs.append(dict(base, side=side, dtype=dtype, warmup=w, repeats=repeats))
            recs[side] = dict(preset=preset, op=op, batch=batch, seconds=seconds, audio_seconds=audio_s, side=side,
                              dtype=dtype, purpose=purpose, warmup=w, repeats=repeats, isolation=args.isolation)
    return jobs, case_recs


def run_jobs(jobs: list[dict], isolation: str, timeout: float):
    """Yields (job, (status, payload)) as each job finishes. side: each job in a fresh process; case: the jobs
    of one case in one process; warm: the jobs of one side (all its cases) in one process, its results
    streamed back one by one."""
    if isolation == "side":
        for job in jobs:
            yield job, _run_isolated(job, timeout)
        return
    key = "case" if isolation == "case" else "side"
    groups: dict = {}
    for job in jobs:
        groups.setdefault(job[key], []).append(job)
    for group in groups.values():
        yield from zip(group, in_child_each(run_side, group, timeout))


def _run_isolated(job: dict, timeout: float):
    try:
        return "ok", in_child(run_side, job, timeout)
    except RuntimeError as e:
        return "error", str(e)


def _compare_sides(case_recs: dict, d: str) -> None:
    """Agreement with transformers eager and speedups of ours over each reference side measured so far."""
    hf = case_recs.get("hf")
    for side, rec in case_recs.items():
        if "median_s" not in rec or "error" in rec:
            continue
        if side != "hf" and hf is not None and "median_s" in hf:
            rec.update(agreement(d, side))
        for ref in ("hf", "hf-compile"):
            r = case_recs.get(ref)
            if side.startswith("ours") and r and "median_s" in r and "error" not in r:
                rec[f"speedup_vs_{ref.replace('-', '_')}"] = r["median_s"] / rec["median_s"]
                if ref == "hf" and r.get("peak_mem_bytes"):
                    rec["mem_ratio_vs_hf"] = rec["peak_mem_bytes"] / r["peak_mem_bytes"]


def _print_side(rec: dict) -> None:
    name = f"  {rec['preset']} {rec['op']} B{rec['batch']} {rec['seconds']:g}s {rec['side']:10s}"
    if "error" in rec:
        print(f"{name} ERROR {rec['error'].splitlines()[0]}", flush=True)
        return
    extra = ""
    if "speedup_vs_hf" in rec:
        extra += f" speedup {rec['speedup_vs_hf']:.2f}x"
    if "code_agreement" in rec:
        extra += f" codes {100 * rec['code_agreement']:.2f}%"
    if "audio_snr_db" in rec:
        extra += f" SNR {rec['audio_snr_db']:.1f} dB"
    if rec.get("compile_s") is not None:
        extra += f" compile {rec['compile_s']:.1f}s"
    if rec.get("loadavg_1min"):
        extra += " load {:.1f}->{:.1f}".format(*rec["loadavg_1min"])
    print(f"{name} median {rec['median_s']:.3f}s RTF {rec['rtf']:.2f} peak {_fmt_mem(rec.get('peak_mem_bytes'))} "
          f"MiB{extra}", flush=True)


def write_outputs(records: list[dict], info: dict, out: Path, tag: str, args) -> str:
    """The markdown table and the JSON under --out (and at --markdown / --json); returns the markdown."""
    md = markdown(records, info)
    js = json.dumps({"machine": info, "records": records}, indent=1, default=str)
    for path, text in ((out / f"bench_model_{tag}.md", md), (out / f"bench_model_{tag}.json", js),
                       (args.markdown, md), (args.json, js)):
        if path:
            tmp = Path(f"{path}.part")
            tmp.write_text(text)
            tmp.replace(path)
    return md


def _sampling_rate(preset: str) -> int:
    from dac_fast import DacConfig

    return DacConfig.from_preset(preset).sampling_rate


if __name__ == "__main__":
    sys.exit(main())
