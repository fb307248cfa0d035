"""DacFeatureExtractor: transformers' DacFeatureExtractor behaviour without transformers."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from .loading import PREPROCESSOR_NAME

logger = logging.getLogger(__name__)


class DacFeatureExtractor:
    """Turns raw mono audio (one clip or a batch) into ``input_values`` (B, 1, T) right-padded to a multiple
    of ``hop_length``, with a ``padding_mask`` (B, T) of 1 for real samples and 0 for padding."""

    model_input_names = ["input_values", "n_quantizers"]

    def __init__(self, feature_size: int = 1, sampling_rate: int = 16000, padding_value: float = 0.0,
                 hop_length: int = 512, **kwargs):
        if feature_size != 1:
            raise ValueError(f"feature_size must be 1 (mono audio only), got {feature_size}")
        self.feature_size = feature_size
        self.sampling_rate = int(sampling_rate)
        self.padding_value = float(padding_value)
        self.hop_length = int(hop_length)
        self.padding_side = "right"
        self.return_attention_mask = True

    @classmethod
    def from_pretrained(cls, path) -> "DacFeatureExtractor":
        """Read ``preprocessor_config.json`` from a directory (or the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PREPROCESSOR_NAME)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        keys = ("feature_size", "sampling_rate", "padding_value", "hop_length")
        return cls(**{k: data[k] for k in keys if k in data})

    @classmethod
    def from_config(cls, config) -> "DacFeatureExtractor":
        """The extractor matching a DacConfig (hop length derived from the ratios)."""
        return cls(sampling_rate=config.sampling_rate, hop_length=config.hop_length)

    def __call__(self, raw_audio, padding=None, truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None, sampling_rate: int | None = None) -> dict:
        """raw_audio: one clip (np.ndarray / list of floats, shape (T,)) or a batch (list of clips).

        Returns a dict with ``input_values`` (B, 1, T') and, when padding, ``padding_mask`` (B, T').
        return_tensors: "pt", "np" or None (lists of arrays).
        """
        if sampling_rate is not None:
            if sampling_rate != self.sampling_rate:
                raise ValueError(
                    f"sampling_rate {sampling_rate} does not match the feature extractor's {self.sampling_rate}: "
                    f"resample the audio to {self.sampling_rate} Hz first"
                )
        else:
            logger.warning("pass `sampling_rate` to DacFeatureExtractor() to avoid silent rate mismatches")
        if padding and truncation:
            raise ValueError("Both padding and truncation were set. Make sure you only set one.")
        if padding is None:
            padding = True
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if padding == "do_not_pad":
            padding = False

        is_batched = isinstance(raw_audio, (list, tuple)) and len(raw_audio) > 0 and isinstance(
            raw_audio[0], (np.ndarray, tuple, list, torch.Tensor))
        clips = list(raw_audio) if is_batched else [raw_audio]
        if len(clips) == 0:
            raise ValueError("raw_audio is empty: expected a clip or a non-empty list of clips")
        arrays = []
        for i, clip in enumerate(clips):
            if isinstance(clip, torch.Tensor):
                clip = clip.detach().cpu().numpy()
            array = np.asarray(clip)
            if array.dtype.kind not in "fiu":
                raise TypeError(f"raw_audio[{i}] must hold numbers, got dtype {array.dtype}")
            array = array.astype(np.float32)
            if array.ndim > 2:
                raise ValueError(f"Expected input shape (channels, length) but got shape {array.shape}")
            if array.ndim != 1:
                raise ValueError(f"Expected mono audio but example has {array.shape[0]} channels")
            if array.size == 0:
                raise ValueError(f"raw_audio[{i}] is empty")
            arrays.append(array)

        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            arrays = [a[:max_length] for a in arrays]

        out: dict = {}
        if padding:
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                target = max_length
            else:
                target = max(a.shape[0] for a in arrays)
            target = -(-target // self.hop_length) * self.hop_length
            values = np.full((len(arrays), 1, target), self.padding_value, dtype=np.float32)
            mask = np.zeros((len(arrays), target), dtype=np.int32)
            for i, a in enumerate(arrays):
                n = min(a.shape[0], target)
                values[i, 0, :n] = a[:n]
                mask[i, :n] = 1
            out["input_values"] = values
            out["padding_mask"] = mask
        else:
            out["input_values"] = [a[None, :] for a in arrays]

        if return_tensors == "pt":
            out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else [torch.from_numpy(x) for x in v]
                   for k, v in out.items()}
        elif return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return out

    def to_dict(self) -> dict:
        return {"feature_extractor_type": "DacFeatureExtractor", "feature_size": self.feature_size,
                "sampling_rate": self.sampling_rate, "padding_value": self.padding_value,
                "hop_length": self.hop_length, "padding_side": "right", "return_attention_mask": True}
