"""`import dac_fast` and the model, ops and feature extractor need only torch and numpy.

A fresh interpreter blocks the optional packages (the audio-file libraries, Ray, tqdm, pyarrow, ...) with a
sys.meta_path finder, as on a machine where they are not installed, then builds a preset model, encodes and
decodes, and checks that calling a function that does need one of them names the package and how to install it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dac_fast import DacConfig
from dac_fast.tiles import decoded_length

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ["soundfile", "soxr", "pyloudnorm", "scipy", "ray", "tqdm", "pyarrow", "pandas", "safetensors",
           "huggingface_hub", "transformers", "starlette", "uvicorn", "websockets", "prometheus_client"]

CHILD = r"""
import importlib.abc, json, sys

BLOCKED = set(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocker())

import numpy as np
import torch

import dac_fast
import dac_fast.distributed.cluster, dac_fast.serving, dac_fast.serving.command, dac_fast.serving.ray_serve
from dac_fast import DacConfig, DacFeatureExtractor, DacModel, ops
from dac_fast import io as aio

report = {}
model = DacModel.from_preset("16khz", seed=0)
fe = DacFeatureExtractor.from_config(model.config)
t = np.arange(4003) / 16000
clip = (0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
inputs = fe(clip, sampling_rate=16000, return_tensors="pt")
with torch.inference_mode():
    enc = model.encode(inputs["input_values"])
    audio = model.decode(audio_codes=enc.audio_codes).audio_values
report["codes_shape"] = list(enc.audio_codes.shape)
report["audio_shape"] = list(audio.shape)
report["audio_finite"] = bool(torch.isfinite(audio).all())
report["kernels"] = sorted(ops._KERNEL_DEVICES)

errors = {}
for name, call in [
    ("read_audio", lambda: aio.read_audio(sys.argv[2])),
    ("resample", lambda: aio.resample(clip, 16000, 44100)),
    ("loudness", lambda: aio.loudness(clip, 16000)),
]:
    try:
        call()
        errors[name] = None
    except ImportError as exc:
        errors[name] = [type(exc).__name__, str(exc)]
report["errors"] = errors
report["loaded_blocked"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("REPORT " + json.dumps(report))
"""


def test_model_ops_and_feature_extractor_need_only_torch_and_numpy(tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF....WAVEfmt ")  # never opened: the import of soundfile fails first
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(BLOCKED), str(wav)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])

    config = DacConfig.from_preset("16khz")
    frames = -(-4003 // config.hop_length)
    assert report["codes_shape"] == [1, config.n_codebooks, frames]
    assert report["audio_shape"] == [1, decoded_length(config, frames)]
    assert report["audio_finite"]
    assert report["loaded_blocked"] == []

    expected = {"read_audio": ("soundfile", "pip install soundfile"),
                "resample": ("soxr", "pip install soxr"),
                "loudness": ("pyloudnorm", "pip install pyloudnorm")}
    for name, (package, install) in expected.items():
        kind, message = report["errors"][name]
        assert kind == "MissingDependencyError", (name, kind, message)
        assert f"needs the '{package}' package" in message, message
        assert install in message, message


@pytest.mark.parametrize("module,blocked,package,extra", [
    ("pyarrow.parquet", ("pyarrow", "pyarrow.parquet"), "pyarrow", "ray"),
    ("ray.serve", ("ray.serve",), "ray[serve]", "serve-ray"),
], ids=["ray-engine", "ray-serve"])
def test_optional_engines_name_their_extra(monkeypatch, module, blocked, package, extra):
    from dac_fast import io as aio

    for name in blocked:  # None in sys.modules: importing it raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(aio.MissingDependencyError) as caught:
        aio.require(module, "the feature")
    message = str(caught.value)
    assert f"the feature needs the {package!r} package" in message
    assert f"pip install 'dac-fast[{extra}]'" in message
    assert isinstance(caught.value, ImportError)
