"""DacFeatureExtractor: transformers' DacFeatureExtractor behaviour without transformers."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from .configuration import CONFIG_NAME, DacConfig, hop_length_for_rate
from .loading import PREPROCESSOR_NAME, _resolve_directory

logger = logging.getLogger(__name__)

# Integer PCM as WAV files store it: (offset, full scale). Scaled to [-1, 1) the way soundfile and torchaudio
# read such files as float; 8-bit WAV is unsigned around 128.
_PCM_FORMATS = {"uint8": (128, 2**7), "int16": (0, 2**15), "int32": (0, 2**31)}
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def pcm_to_float(audio, name: str = "raw_audio"):
    """Float audio unchanged; integer PCM (uint8, int16, int32: numpy array or torch tensor) scaled to float32 in
    [-1, 1); any other dtype a TypeError naming ``name``. The feature extractor and ``DacModel.encode`` share it,
    so integer audio means the same in both."""
    dtype = str(audio.dtype).removeprefix("torch.")
    if dtype in _FLOAT_DTYPES:
        return audio
    if dtype not in _PCM_FORMATS:
        raise TypeError(
            f"{name} must be float audio in [-1, 1] or integer PCM ({', '.join(_PCM_FORMATS)}), got dtype {dtype}"
        )
    offset, scale = _PCM_FORMATS[dtype]
    if isinstance(audio, torch.Tensor):
        return ((audio.double() - offset) / scale).float()
    return ((audio.astype(np.float64) - offset) / scale).astype(np.float32)


class DacFeatureExtractor:
    """Turns raw mono audio (one clip or a batch) into ``input_values`` (B, 1, T) right-padded to a multiple
    of ``hop_length``, with a ``padding_mask`` (B, T) of 1 for real samples and 0 for padding.

    ``hop_length`` defaults to the hop of the official model for ``sampling_rate`` (320 at 16 and 24 kHz, 512 at
    44.1 kHz; 512, transformers' default, for other rates). Integer PCM (uint8, int16, int32) is scaled to
    [-1, 1) as audio libraries read it as float; transformers' extractor passes it on unscaled.
    """

    model_input_names = ["input_values", "n_quantizers"]

    def __init__(self, feature_size: int = 1, sampling_rate: int = 16000, padding_value: float = 0.0,
                 hop_length: int | None = None, **kwargs):
        if feature_size != 1:
            raise ValueError(f"feature_size must be 1 (mono audio only), got {feature_size}")
        self.feature_size = feature_size
        self.sampling_rate = int(sampling_rate)
        self.padding_value = float(padding_value)
        if hop_length is None:
            hop_length = hop_length_for_rate(self.sampling_rate) or 512
        self.hop_length = int(hop_length)
        self.padding_side = "right"
        self.return_attention_mask = True

    @classmethod
    def from_pretrained(cls, path_or_id) -> "DacFeatureExtractor":
        """Read ``preprocessor_config.json`` from a directory, a hub id or the file itself; a model directory
        without one gives the extractor matching its ``config.json``."""
        path = os.fspath(path_or_id)
        if not os.path.isfile(path):
            directory = _resolve_directory(path)
            path = os.path.join(directory, PREPROCESSOR_NAME)
            if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, CONFIG_NAME)):
                return cls.from_config(DacConfig.from_pretrained(directory))
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        keys = ("feature_size", "sampling_rate", "padding_value", "hop_length")
        return cls(**{k: data[k] for k in keys if k in data})

    @classmethod
    def from_config(cls, config) -> "DacFeatureExtractor":
        """The extractor matching a DacConfig or a model (hop length derived from the ratios)."""
        config = getattr(config, "config", config)
        return cls(sampling_rate=config.sampling_rate, hop_length=config.hop_length)

    @classmethod
    def from_preset(cls, name: str) -> "DacFeatureExtractor":
        """The extractor matching ``DacConfig.from_preset(name)`` / ``DacModel.from_preset(name)``."""
        return cls.from_config(DacConfig.from_preset(name))

    def save_pretrained(self, directory) -> None:
        """Write ``preprocessor_config.json`` (readable by transformers' AutoFeatureExtractor)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, PREPROCESSOR_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __call__(self, raw_audio, padding=None, truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None, sampling_rate: int | None = None) -> dict:
        """raw_audio: one clip (np.ndarray / list of floats / tensor, shape (T,) or (1, T)) or a batch (list of
        clips); float in [-1, 1] or integer PCM.

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
        arrays = [self._mono_clip(clip, f"raw_audio[{i}]" if is_batched else "raw_audio")
                  for i, clip in enumerate(clips)]

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

    @staticmethod
    def _mono_clip(clip, name: str) -> np.ndarray:
        """One clip as a float32 vector of samples, or an error naming ``name``."""
        if isinstance(clip, torch.Tensor):
            clip = clip.detach().cpu()
            clip = clip.float() if clip.dtype == torch.bfloat16 else clip  # numpy has no bfloat16
            clip = clip.numpy()
        array = np.asarray(clip)
        if array.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
        array = pcm_to_float(array, name).astype(np.float32)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1:
            raise ValueError(
                f"{name} has shape {array.shape}: expected mono audio, a 1-D array of samples. Split multi-channel "
                "audio into one clip per channel (list(audio.T) for a (samples, channels) array, list(audio) for "
                "(channels, samples)) or mix it down (e.g. audio.mean(axis=-1) for (samples, channels))"
            )
        if array.size == 0:
            raise ValueError(f"{name} is empty")
        return array

    def to_dict(self) -> dict:
        return {"feature_extractor_type": "DacFeatureExtractor", "feature_size": self.feature_size,
                "sampling_rate": self.sampling_rate, "padding_value": self.padding_value,
                "hop_length": self.hop_length, "padding_side": "right", "return_attention_mask": True}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
