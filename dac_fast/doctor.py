"""``dac-fast doctor``: what this installation has (versions, kernels, devices, allocator, build flags)."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _kernels(status: dict, torch) -> dict:
    """Per device: "active (...)" or why not."""
    out = {}
    if not status["loaded"]:
        why = f"not active: {status['error']}"
        return {"cpu": why, "cuda": why}
    where = "prebuilt in the package" if status["source"] == "package" else f"compiled just in time in {status['source']}"
    out["cpu"] = f"active ({where})" if "cpu" in status["devices"] else "not active: the library has no CPU kernels"
    if "cuda" in status["devices"]:
        out["cuda"] = f"active ({where})" + ("" if torch.cuda.is_available() else ", but no CUDA device is visible")
    elif torch.version.cuda is None:
        out["cuda"] = "not active: this torch has no CUDA support"
    else:
        out["cuda"] = ("not active: the library was built without CUDA kernels (rebuild with DAC_FAST_BUILD=cuda, or "
                       "remove it so that dac_fast compiles them on first use where a GPU and nvcc are present)")
    backend = os.environ.get("DAC_FAST_BACKEND", "auto")
    if backend == "torch":
        out = {k: v + "; DAC_FAST_BACKEND=torch forces pure torch" for k, v in out.items()}
    return out


def _cuda(torch) -> str:
    if torch.version.cuda is None:
        return "none (torch built without CUDA)"
    if not torch.cuda.is_available():
        return f"none visible (torch built for CUDA {torch.version.cuda}; no driver or GPU, or CUDA_VISIBLE_DEVICES hides it)"
    devs = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devs.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return f"CUDA {torch.version.cuda}: " + "; ".join(devs)


def _allocator() -> str:
    parts = []
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        parts.append("glibc malloc; dac-fast encode/decode set M_MMAP_MAX=0 and M_TRIM_THRESHOLD=2**31-1 at start "
                     "(large temporaries stop page-faulting)")
    else:
        parts.append(f"{platform.libc_ver()[0] or 'non-glibc'} malloc (not tuned)")
    parts.append(f"CPU buffer cache DAC_FAST_CPU_CACHE_MB={os.environ.get('DAC_FAST_CPU_CACHE_MB', '64 (default)')}")
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    return "; ".join(parts)


def _build_flags(status: dict) -> str | dict:
    from . import _build

    here = os.path.dirname(os.path.abspath(__file__))
    where = here if status["source"] in (None, "package") else status["source"]
    try:
        with open(os.path.join(where, _build.BUILD_INFO)) as f:
            return json.load(f)
    except OSError:
        return "not recorded (no library loaded, or built before build records existed)"


def report() -> dict:
    import torch

    from . import __version__, ops

    status = ops.extension_status()
    kernels = _kernels(status, torch)
    return {
        "dac_fast": f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} CPU threads",
        "numpy / soundfile / soxr": " / ".join(_version(d) for d in ("numpy", "soundfile", "soxr")),
        "kernels cpu": kernels["cpu"],
        "kernels cuda": kernels["cuda"],
        "backend": f"DAC_FAST_BACKEND={os.environ.get('DAC_FAST_BACKEND', 'auto')}, "
                   f"DAC_FAST_JIT={os.environ.get('DAC_FAST_JIT', 'auto')}",
        "cuda device": _cuda(torch),
        "allocator": _allocator(),
        "extension build": _build_flags(status),
    }
