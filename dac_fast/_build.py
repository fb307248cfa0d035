"""How the extension ``dac_fast._C`` is compiled: one place for setup.py (ahead of time) and for
dac_fast.ops (just in time, on first use). Imports nothing from dac_fast (setup.py loads this file
by path) and imports torch only inside functions."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

CPU_SOURCES = ("dac_fast.cpp", "cpu/kernels_cpu.cpp", "cpu/buffer_cache.cpp")
CUDA_SOURCES = ("cuda/kernels.cu",)
BUILD_INFO = "_build_info.json"  # written next to the compiled library: what doctor reports


def source_root() -> str | None:
    """The csrc/ directory: inside the installed package (wheels ship it for the just-in-time build),
    else next to the package (a source checkout). None when neither has the sources."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if all(os.path.isfile(os.path.join(cand, s)) for s in CPU_SOURCES):
            return cand
    return None


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. /usr/local/bin/nvcc may be a wrapper script, so prefer CUDA_HOME,
    then /usr/local/cuda, then the directory above a real nvcc binary."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.isdir(os.path.join(cand, "include")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(home, "include")):
            return home
    return None


def nvidia_pip_includes() -> list[str]:
    """Include dirs of the pip ``nvidia-*`` packages (cusparse.h / cublas_v2.h live there when the
    toolkit lacks them)."""
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "include"))):
            if d not in out and (os.path.exists(os.path.join(d, "cusparse.h")) or os.path.exists(os.path.join(d, "cublas_v2.h"))):
                out.append(d)
    return out


def cpu_arch_flags() -> list[str]:
    """x86-64 vector flags: ``DAC_FAST_CPU_ARCH`` (``native``, ``generic`` or flags), default AVX2+FMA+F16C."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    choice = os.environ.get("DAC_FAST_CPU_ARCH", "").strip()
    if choice == "generic":
        return []
    if choice == "native":
        return ["-march=native"]
    if choice:
        return choice.split()
    return ["-mavx2", "-mfma", "-mf16c"]


def cxx_std(torch_version: str) -> str:
    # torch >= 2.6 headers need C++17 at least; newer ones want C++20 features guarded by macros
    try:
        major, minor = (int(v) for v in torch_version.split(".")[:2])
    except ValueError:
        return "c++17"
    return "c++20" if (major, minor) >= (2, 10) else "c++17"


def opt_level() -> str:
    """``DAC_FAST_OPT`` (default ``-O3``): the packaging test builds with ``-O0`` to finish quickly."""
    return os.environ.get("DAC_FAST_OPT", "-O3").strip() or "-O3"


def cxx_flags(torch_version: str) -> list[str]:
    return [opt_level(), f"-std={cxx_std(torch_version)}", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
            "-fno-trapping-math", "-DNDEBUG"] + cpu_arch_flags()


def nvcc_flags(torch_version: str) -> list[str]:
    return ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr", f"-std={cxx_std(torch_version)}",
            "-DDAC_FAST_WITH_CUDA=1", f"--threads={max(1, min(4, os.cpu_count() or 1))}"]


def link_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def libraries() -> list[str]:
    return ["gomp"] if sys.platform.startswith("linux") else []


def default_cuda_arch_list() -> None:
    """Without a visible GPU nvcc has no architecture to detect: default to A100 and H100 (+PTX)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    try:
        import torch

        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        visible = False
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def build_info(how: str, with_cuda: bool, torch_version: str, cuda_home: str | None) -> dict:
    """What doctor shows about a build."""
    info = {"built_by": how, "torch": torch_version, "cuda": with_cuda, "cxx_flags": cxx_flags(torch_version)}
    if with_cuda:
        info.update(nvcc_flags=nvcc_flags(torch_version), cuda_home=cuda_home,
                    cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "<detected GPU>"))
    return info
