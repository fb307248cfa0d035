"""Packaging and the just-in-time kernel build: the sdist ships every build source, a wheel built from
it carries the compiled extension (or, built without torch, the sources for the just-in-time build),
and the just-in-time build is announced, locked against concurrent importers and can be turned off."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(**extra):
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _have(module):
    return subprocess.run([PY, "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    if not _have("build"):
        pytest.skip("the 'build' package is not installed (pip install build)")
    out = tmp_path_factory.mktemp("sdist")
    # --no-isolation: setuptools and wheel from this environment (CI may be offline)
    r = subprocess.run([PY, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(REPO)],
                       capture_output=True, text=True, timeout=300, env=_env(DAC_FAST_BUILD="none"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (path,) = out.glob("dac_fast-*.tar.gz")
    return path


def test_sdist_ships_every_build_source(sdist):
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    needed = {str(p.relative_to(REPO)) for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert needed and {"csrc/include/dac_fast_ops.h", "csrc/cuda/kernels.cu"} <= needed
    missing = needed - names
    assert not missing, missing
    assert {"pyproject.toml", "setup.py", "dac_fast/_build.py", "README.md"} <= names


def _wheel(sdist, out, mode):
    # -O0: this checks packaging, not speed; an optimized build takes several minutes on two cores
    r = subprocess.run([PY, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-w", str(out),
                        str(sdist)], capture_output=True, text=True, timeout=900,
                       env=_env(DAC_FAST_BUILD=mode, DAC_FAST_OPT="-O0"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("dac_fast-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_without_extension_carries_the_sources_for_the_jit_build(sdist, tmp_path):
    names = set(_wheel(sdist, tmp_path, "none").namelist())
    assert not [n for n in names if n.startswith("dac_fast/_C")]
    assert {"dac_fast/csrc/include/dac_fast_ops.h", "dac_fast/csrc/dac_fast.cpp", "dac_fast/csrc/cpu/kernels_cpu.cpp"} <= names
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.slow
def test_wheel_from_sdist_contains_the_compiled_extension(sdist, tmp_path):
    """The CPU build from the sdist, as CI runs it (a few minutes on two cores)."""
    whl = _wheel(sdist, tmp_path, "cpu")
    names = set(whl.namelist())
    assert [n for n in names if n.startswith("dac_fast/_C") and n.endswith(".so")], sorted(names)
    info = json.loads(whl.read("dac_fast/_build_info.json"))
    assert info["built_by"] == "setup.py" and info["cuda"] is False and "-ffp-contract=off" in info["cxx_flags"]
    assert "-O0" in info["cxx_flags"]


# ------------------------------------------------------------------------------ just in time
_NO_PREBUILT = textwrap.dedent("""
    import sys
    sys.modules["dac_fast._C"] = None  # as if no prebuilt library: its import raises ImportError
""")


def _python(code, **env):
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300, env=_env(**env), cwd=str(REPO))


def test_jit_disabled_runs_pure_torch_and_says_so(tmp_path):
    r = _python(_NO_PREBUILT + "import dac_fast.ops as o; print(o.extension_status())",
                DAC_FAST_JIT="0", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "'loaded': False" in r.stdout and "DAC_FAST_JIT=0" in r.stderr and "pure-torch" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing compiled
    r = _python(_NO_PREBUILT + "import dac_fast.ops", DAC_FAST_JIT="sometimes")
    assert r.returncode != 0 and "DAC_FAST_JIT must be one of" in r.stderr


_FAKE_LOAD = textwrap.dedent("""
    import os, sys, time, types
    import torch.utils.cpp_extension as ce
    import dac_fast.ops as o
    log = sys.argv[1]

    def fake_load(name, sources, build_directory, **kw):
        # what torch's load would do: compile once (slowly), later calls reuse the library
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {time.time()}\\n")
        if not os.path.exists(os.path.join(build_directory, "_C.so")):
            time.sleep(1.0)
            open(os.path.join(build_directory, "_C.so"), "w").close()
        with open(log, "a") as f:
            f.write(f"end {os.getpid()} {time.time()} {name} {len(sources)}\\n")
        return types.SimpleNamespace(name=name)

    ce.load = fake_load
    module, directory = o._jit_build()
    print(directory)
""")


def test_jit_build_is_announced_once_and_serialized_across_processes(tmp_path):
    """Several processes importing at once: one compiles (one notice), the others wait, nobody overlaps;
    the build lands in a directory of its own per torch version; build flags are recorded."""
    cache, log = tmp_path / "cache", tmp_path / "log"
    procs = [subprocess.Popen([PY, "-c", _FAKE_LOAD, str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(TORCH_EXTENSIONS_DIR=str(cache)), cwd=str(REPO)) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    notices = [e for _, e in outs if "dac_fast: compiling the CPU kernels" in e]
    assert len(notices) == 1 and "DAC_FAST_JIT=0" in notices[0]
    (directory,) = {o.strip() for o, _ in outs}
    import torch

    assert Path(directory).parent == cache and torch.__version__.split("+")[0].replace(".", "_") in Path(directory).name
    events = sorted((float(line.split()[2]), line.split()[0]) for line in log.read_text().splitlines())
    assert [kind for _, kind in events] == ["start", "end"] * 3  # never two inside the build at once
    info = json.loads((Path(directory) / "_build_info.json").read_text())
    assert info["built_by"].startswith("just in time") and "-O3" in info["cxx_flags"]


def test_jit_build_failure_falls_back_with_one_warning(tmp_path):
    code = _NO_PREBUILT + textwrap.dedent("""
        import torch.utils.cpp_extension as ce
        def broken(**kw):
            raise RuntimeError("Error building extension '_C': g++ not found")
        ce.load = lambda *a, **k: broken()
        import dac_fast.ops as o
        print(o.extension_status()["loaded"])
    """)
    r = _python(code, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert "g++ not found" in r.stderr and "pure-torch ops (slower)" in r.stderr
    r = _python(code, TORCH_EXTENSIONS_DIR=str(tmp_path), DAC_FAST_JIT="1")
    assert r.returncode != 0 and "g++ not found" in r.stderr
