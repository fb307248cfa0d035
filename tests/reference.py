"""Reference implementations and inputs shared by the tests.

- transformers' DacModel with the same seeded random weights as ours;
- the original descript-audio-codec package, imported with a stand-in for `audiotools` where the real one
  cannot be imported (it needs a torchaudio matching torch; the tensor-level DAC code never uses it);
- non-trivial test audio (harmonic chords with vibrato, formant-like bursts, noise, silence).
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from dac_fast import DacConfig, DacModel
from dac_fast.configuration import TRANSFORMERS_FIELDS
from dac_fast.loading import randomize_

HF_FIELDS = TRANSFORMERS_FIELDS


def hf_config(config: DacConfig, **overrides):
    transformers = pytest.importorskip("transformers")
    fields = {f: getattr(config, f) for f in HF_FIELDS}
    fields.update(overrides)
    return transformers.DacConfig(**fields)


def model_pair(preset: str, seed: int = 0, **overrides):
    """(transformers DacModel, dac_fast DacModel) in eval mode with identical seeded random weights."""
    transformers = pytest.importorskip("transformers")
    config = DacConfig.from_preset(preset)
    hf = transformers.DacModel(hf_config(config, **overrides))
    randomize_(hf, seed)
    hf.eval()
    return hf, DacModel.from_transformers(hf)


def synth_audio(n_samples: int, sampling_rate: int, seed: int = 0) -> np.ndarray:
    """Deterministic audio with structure at many time scales, peak about 0.8."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / sampling_rate
    f0 = rng.uniform(110, 330)
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)
    music = sum(np.sin(2 * np.pi * f0 * r * k * vibrato * t) / k for r in (1, 1.25, 1.5) for k in (1, 2, 3))
    envelope = (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0).astype(float)
    speechy = np.sin(2 * np.pi * rng.uniform(500, 900) * t) * np.sin(2 * np.pi * 130 * t) ** 8 * envelope
    noise = rng.standard_normal(n_samples) * 0.05
    x = 0.25 * music + 0.5 * speechy + noise
    x[: n_samples // 10] *= 0.0  # a stretch of silence
    return (0.8 * x / np.abs(x).max()).astype(np.float32)


def import_original_dac():
    """The original `dac` package, or skip. Where `audiotools` cannot be imported, a stand-in module providing
    only the names DAC's model code imports is installed first (audiotools' own import needs torchaudio)."""
    try:
        import audiotools  # noqa: F401
    except Exception:
        stub = types.ModuleType("audiotools")
        ml = types.ModuleType("audiotools.ml")

        class BaseModel(nn.Module):
            INTERN: list = []
            EXTERN: list = []

        class AudioSignal:  # only referenced in annotations and file helpers, never in tensor code
            def __init__(self, *args, **kwargs):
                raise RuntimeError("audiotools stand-in: AudioSignal is unavailable in tests")

        ml.BaseModel = BaseModel
        ml.Accelerator = None  # dac.utils aliases it at import; only its training scripts use it
        stub.ml = ml
        stub.AudioSignal = AudioSignal
        stub.STFTParams = lambda *a, **k: None
        sys.modules.setdefault("audiotools", stub)
        sys.modules.setdefault("audiotools.ml", ml)
    try:
        return importlib.import_module("dac")
    except Exception as exc:  # not installed, or its dependencies (einops, argbind) are missing
        pytest.skip(f"descript-audio-codec is not importable: {type(exc).__name__}: {exc}")


@torch.no_grad()
def randomize_original_(model: nn.Module, seed: int) -> None:
    """Seeded weights for an original DAC: random weight_v directions, weight_g magnitudes, biases, alphas."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("weight_v") or name.endswith("original1"):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        elif name.endswith("weight_g") or name.endswith("original0"):
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        elif name.endswith("alpha"):
            p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.5)
        else:  # codebooks
            p.copy_(torch.randn(p.shape, generator=gen))
