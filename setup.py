"""Build and packaging for dac_fast.

The compiled extension ``dac_fast._C`` (fused Snake and residual-vector-quantizer operators) is
optional: ``import dac_fast`` works without it (pure torch). The environment variable
``DAC_FAST_BUILD`` selects what is built:

* ``auto`` (default): CUDA + CPU kernels when nvcc and a CUDA-enabled torch are present, CPU only otherwise
* ``cpu``: CPU kernels only
* ``cuda``: CPU + CUDA kernels; fails when CUDA cannot be used
* ``none``: no extension (pure-torch package)

``TORCH_CUDA_ARCH_LIST`` overrides the GPU architectures; when it is unset and no GPU is visible
the default is ``8.0;9.0+PTX``. ``DAC_FAST_CPU_ARCH`` overrides the x86-64 vector flags
(default ``-mavx2 -mfma -mf16c``; ``native`` or ``generic`` are also accepted).

Both ``pip install -e . --no-build-isolation`` and ``python setup.py build_ext --inplace`` work.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("DAC_FAST_BUILD", "auto").strip().lower()
if MODE not in ("auto", "cpu", "cuda", "none"):
    raise SystemExit(f"DAC_FAST_BUILD must be auto, cpu, cuda or none, got {MODE!r}")


def _log(msg: str) -> None:
    print(f"[dac_fast setup] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root. /usr/local/bin/nvcc may be a wrapper script, so prefer CUDA_HOME,
    then /usr/local/cuda, then the directory above a real nvcc binary."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.isdir(os.path.join(cand, "include")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.isdir(os.path.join(home, "include")):
            return home
    return None


def _nvidia_pip_includes() -> list[str]:
    """Include dirs of the pip ``nvidia-*`` packages (cusparse.h / cublas_v2.h live there when the
    toolkit lacks them)."""
    dirs = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        dirs += sorted(glob.glob(os.path.join(p, "nvidia", "*", "include")))
    out = []
    for d in dirs:
        if d not in out and (os.path.exists(os.path.join(d, "cusparse.h")) or os.path.exists(os.path.join(d, "cublas_v2.h"))):
            out.append(d)
    return out


def _cpu_arch_flags() -> list[str]:
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


def _extensions():
    if MODE == "none":
        _log("DAC_FAST_BUILD=none: building no extension (pure torch)")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and MODE in ("auto", "cuda") and not os.environ.get("CUDA_HOME"):
        # before torch.utils.cpp_extension resolves it (it would take /usr/local from a wrapper nvcc)
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if MODE in ("cpu", "cuda"):
            raise
        _log("torch is not importable at build time: skipping the extension (pure torch)")
        return [], {}

    want_cuda = MODE == "cuda"
    if MODE == "auto":
        want_cuda = cuda_home is not None and torch.version.cuda is not None
    if want_cuda:
        if torch.version.cuda is None:
            raise SystemExit("DAC_FAST_BUILD=cuda but this torch has no CUDA support")
        if cuda_home is None:
            raise SystemExit("DAC_FAST_BUILD=cuda but no CUDA toolkit found (set CUDA_HOME)")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # resolved at import; make the wrapper-safe choice stick
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            visible = False
            try:
                visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
            except Exception:
                visible = False
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        _log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<detected GPU>')})")
    else:
        _log("building CPU kernels only")

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG"] + _cpu_arch_flags()
    # torch >= 2.6 headers need C++17 at least; newer ones want C++20 features guarded by macros.
    try:
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        if (major, minor) >= (2, 10):
            cxx[1] = "-std=c++20"
    except ValueError:
        pass
    sources = ["csrc/dac_fast.cpp", "csrc/cpu/kernels_cpu.cpp", "csrc/cpu/buffer_cache.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    extra = {"cxx": cxx}
    libraries = ["gomp"] if sys.platform.startswith("linux") else []
    # headers: rebuild when they change (the CUDA kernel bodies are in csrc/cuda/kernels.cuh, shared with
    # the test-only emulation in csrc/emulation, which is never part of this extension)
    depends = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "include", "*.h")))
    if want_cuda:
        sources.append("csrc/cuda/kernels.cu")
        depends.append("csrc/cuda/kernels.cuh")
        include_dirs += _nvidia_pip_includes()
        define_macros.append(("DAC_FAST_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr", "-std=" + cxx[1].split("=")[1],
                         "-DDAC_FAST_WITH_CUDA=1", f"--threads={max(1, min(4, os.cpu_count() or 1))}"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="dac_fast._C",
        sources=sources,
        depends=depends,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        libraries=libraries,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    name="dac-fast",
    version="0.1.0",
    description="A fast, drop-in reimplementation of the Descript Audio Codec (DAC) with fused CPU/CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dac_fast", "dac_fast.*"]),
    install_requires=["torch>=2.4", "numpy", "soundfile", "soxr", "pyloudnorm", "safetensors", "tqdm"],
    extras_require={
        "ray": ["ray[data]>=2.9", "pyarrow"],
        "hub": ["huggingface_hub"],
        "test": ["pytest", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["dac-fast = dac_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
