"""Output classes with the fields, order and access styles of transformers' DAC outputs."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch


class ModelOutput(OrderedDict):
    """A dataclass that is also an ordered dict of its non-None fields, like transformers' ModelOutput.

    ``out.audio_codes``, ``out["audio_codes"]``, ``out[2]`` (index into the non-None fields) and
    ``out.to_tuple()`` all work.
    """

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def to_tuple(self) -> tuple:
        return tuple(super(ModelOutput, self).__getitem__(k) for k in self.keys())


@dataclass
class DacOutput(ModelOutput):
    """loss (B,), audio_values (B, T), quantized_representation (B, D, F), audio_codes (B, N, F),
    projected_latents (B, N * d, F)."""

    loss: torch.Tensor | None = None
    audio_values: torch.Tensor | None = None
    quantized_representation: torch.Tensor | None = None
    audio_codes: torch.Tensor | None = None
    projected_latents: torch.Tensor | None = None


@dataclass
class DacEncoderOutput(ModelOutput):
    """loss (B,), quantized_representation (B, D, F), audio_codes (B, N, F), projected_latents (B, N * d, F);
    ours, after transformers' fields and only when ``encode`` got a padding_mask: audio_frames (B,), the
    number of frames of each item (its codes after those are padding)."""

    loss: torch.Tensor | None = None
    quantized_representation: torch.Tensor | None = None
    audio_codes: torch.Tensor | None = None
    projected_latents: torch.Tensor | None = None
    audio_frames: torch.Tensor | None = None


@dataclass
class DacDecoderOutput(ModelOutput):
    """audio_values (B, T)."""

    audio_values: torch.Tensor | None = None
