"""Build of the compiled extension ``dac_fast._C`` (the project's metadata is in pyproject.toml).

The extension (fused Snake and residual-vector-quantizer operators) is optional: ``import
dac_fast`` works without it (pure torch), and when it is missing dac_fast compiles it on first
use into torch's extension cache (see dac_fast/ops.py, ``DAC_FAST_JIT``). The environment
variable ``DAC_FAST_BUILD`` selects what is built here, ahead of time:

* ``auto`` (default): CUDA + CPU kernels when nvcc and a CUDA-enabled torch are present, CPU only
  otherwise; nothing when torch cannot be imported (``pip install .`` builds in an isolated
  environment without torch: the kernels are then compiled on first use)
* ``cpu``: CPU kernels only
* ``cuda``: CPU + CUDA kernels; fails when CUDA cannot be used
* ``none``: no extension

``TORCH_CUDA_ARCH_LIST`` overrides the GPU architectures; when it is unset and no GPU is visible
the default is ``8.0;9.0+PTX``. ``DAC_FAST_CPU_ARCH`` overrides the x86-64 vector flags
(default ``-mavx2 -mfma -mf16c``; ``native`` or ``generic`` are also accepted); ``DAC_FAST_OPT``
the C++ optimization flag (default ``-O3``; tests/test_install.py uses ``-O0`` to build quickly). Compiler flags
live in dac_fast/_build.py, shared with the just-in-time build.

Ahead-of-time builds: ``pip install --no-build-isolation .``, ``pip install -e . --no-build-isolation``
or ``python setup.py build_ext --inplace``. Wheels also carry csrc/ inside the package, so the
just-in-time build works from an installed wheel too.
"""

from __future__ import annotations

import importlib.util
import glob
import json
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("DAC_FAST_BUILD", "auto").strip().lower()
if MODE not in ("auto", "cpu", "cuda", "none"):
    raise SystemExit(f"DAC_FAST_BUILD must be auto, cpu, cuda or none, got {MODE!r}")


def _load_build_config():
    # by path: importing the dac_fast package here would need its dependencies at build time
    spec = importlib.util.spec_from_file_location("_dac_fast_build", os.path.join(ROOT, "dac_fast", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_build_config()


def _log(msg: str) -> None:
    print(f"[dac_fast setup] {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package (dac_fast/csrc) for the just-in-time build."""

    def run(self):
        super().run()
        src = os.path.join(ROOT, "csrc")
        if os.path.isdir(src) and not self.dry_run:
            shutil.copytree(src, os.path.join(self.build_lib, "dac_fast", "csrc"), dirs_exist_ok=True)


def _extensions():
    if MODE == "none":
        _log("DAC_FAST_BUILD=none: building no extension (compiled on first use instead)")
        return [], {}
    cuda_home = B.find_cuda_home()
    if cuda_home and MODE in ("auto", "cuda") and not os.environ.get("CUDA_HOME"):
        # before torch.utils.cpp_extension resolves it (it would take /usr/local from a wrapper nvcc)
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if MODE in ("cpu", "cuda"):
            raise
        _log("torch is not importable at build time (isolated build?): no extension now, "
             "dac_fast compiles it on first use (DAC_FAST_JIT)")
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
        B.default_cuda_arch_list()
        _log(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<detected GPU>')})")
    else:
        _log("building CPU kernels only")

    sources = [os.path.join("csrc", s) for s in B.CPU_SOURCES]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    # headers: rebuild when they change (the CUDA kernel bodies are in csrc/cuda/kernels.cuh, shared with
    # the test-only emulation in csrc/emulation, which is never part of this extension)
    depends = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "include", "*.h")))
    extra = {"cxx": B.cxx_flags(torch.__version__)}
    if want_cuda:
        sources += [os.path.join("csrc", s) for s in B.CUDA_SOURCES]
        depends.append("csrc/cuda/kernels.cuh")
        include_dirs += B.nvidia_pip_includes()
        define_macros.append(("DAC_FAST_WITH_CUDA", "1"))
        extra["nvcc"] = B.nvcc_flags(torch.__version__)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(name="dac_fast._C", sources=sources, depends=depends, include_dirs=include_dirs, define_macros=define_macros,
                  extra_compile_args=extra, extra_link_args=B.link_flags(), libraries=B.libraries())
    info = B.build_info("setup.py", want_cuda, torch.__version__, cuda_home if want_cuda else None)

    class BuildExtWithInfo(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Writes dac_fast/_build_info.json next to the library (``dac-fast doctor`` shows it)."""

        def run(self):
            super().run()
            target = os.path.join(os.path.dirname(self.get_ext_fullpath("dac_fast._C")), B.BUILD_INFO)
            with open(target, "w") as f:
                json.dump(info, f, indent=1)

    return [ext], {"build_ext": BuildExtWithInfo}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
