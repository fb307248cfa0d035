"""DacFeatureExtractor: transformers' DacFeatureExtractor behaviour without transformers."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from .configuration import CONFIG_NAME, DacConfig, hop_length_for_rate
from .features import BatchFeature, _check_tensor_type, pad_features, padding_strategy
from .hub import push_saved
from .hub import save_directory as directory_for
from .hub import HUB_KWARGS, PREPROCESSOR_NAME, resolve_directory

logger = logging.getLogger(__name__)

# Integer PCM as WAV files store it: (offset, full scale). Scaled to [-1, 1) the way soundfile and torchaudio
# read such files as float; 8-bit WAV is unsigned around 128.
_PCM_FORMATS = {"uint8": (128, 2**7), "int16": (0, 2**15), "int32": (0, 2**31)}
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# What to_dict writes and from_dict reads.
_ATTRIBUTES = ("feature_size", "sampling_rate", "padding_value", "hop_length", "padding_side", "return_attention_mask")


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
                 hop_length: int | None = None, padding_side: str = "right", return_attention_mask: bool = True,
                 **kwargs):
        if feature_size != 1:
            raise ValueError(f"feature_size must be 1 (mono audio only), got {feature_size}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.feature_size = feature_size
        self.sampling_rate = int(sampling_rate)
        self.padding_value = float(padding_value)
        if hop_length is None:
            hop_length = hop_length_for_rate(self.sampling_rate) or 512
        self.hop_length = int(hop_length)
        self.padding_side = padding_side
        self.return_attention_mask = bool(return_attention_mask)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DacFeatureExtractor":
        """Read ``preprocessor_config.json`` from a directory, a hub id or the file itself; a model directory
        without one gives the extractor matching its ``config.json``. ``subfolder`` and the hub arguments
        (``revision``, ``cache_dir``, ``local_files_only``, ``force_download``, ``token``) as in transformers;
        other keyword arguments override the stored attributes."""
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(path):
            directory = resolve_directory(path, **hub_kwargs)
            path = os.path.join(directory, PREPROCESSOR_NAME)
            if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, CONFIG_NAME)):
                return cls.from_config(DacConfig.from_pretrained(directory), **kwargs)
        return cls.from_json_file(path, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs) -> "DacFeatureExtractor":
        """The extractor matching a DacConfig or a model (hop length derived from the ratios)."""
        config = getattr(config, "config", config)
        return cls(**{"sampling_rate": config.sampling_rate, "hop_length": config.hop_length, **kwargs})

    @classmethod
    def from_preset(cls, name: str) -> "DacFeatureExtractor":
        """The extractor matching ``DacConfig.from_preset(name)`` / ``DacModel.from_preset(name)``."""
        return cls.from_config(DacConfig.from_preset(name))

    # ------------------------------------------------------------------ serialization (transformers' methods)
    def to_dict(self) -> dict:
        return {"feature_extractor_type": "DacFeatureExtractor", "feature_size": self.feature_size,
                "sampling_rate": self.sampling_rate, "padding_value": self.padding_value,
                "hop_length": self.hop_length, "padding_side": self.padding_side,
                "return_attention_mask": self.return_attention_mask}

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict, **kwargs) -> "DacFeatureExtractor":
        """The extractor ``to_dict`` describes (keys it does not know, such as transformers' ``processor_class``,
        are ignored); ``kwargs`` override."""
        return cls(**{k: v for k, v in {**feature_extractor_dict, **kwargs}.items() if k in _ATTRIBUTES})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file, **kwargs) -> "DacFeatureExtractor":
        with open(json_file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write ``preprocessor_config.json`` (readable by transformers' AutoFeatureExtractor); returns
        ``[its path]`` as transformers does. ``push_to_hub=True`` uploads the directory (huggingface_hub)."""
        with directory_for(save_directory, push_to_hub, kwargs) as directory:
            path = os.path.join(directory, PREPROCESSOR_NAME)
            self.to_json_file(path)
        return [path]

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload this extractor's ``preprocessor_config.json`` to the hub (needs huggingface_hub)."""
        return push_saved(self, repo_id, **kwargs)

    def __eq__(self, other) -> bool:
        return isinstance(other, DacFeatureExtractor) and self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------ padding and the call
    def pad(self, processed_features, padding=True, max_length: int | None = None, truncation: bool = False,
            pad_to_multiple_of: int | None = None, return_attention_mask: bool | None = None,
            return_tensors=None) -> BatchFeature:
        """Pad (and with ``truncation``, cut) a batch of features, as transformers' sequence feature extractors do:
        ``processed_features`` is a BatchFeature/dict with ``input_values`` (lists, numpy arrays or tensors) or a
        list of such dicts (a data collator's batch). ``padding``: True/"longest", "max_length" (needs
        ``max_length``) or False/"do_not_pad"; lengths are rounded up to ``pad_to_multiple_of``; padding uses
        ``padding_value`` on ``padding_side``; float64 becomes float32; ``attention_mask`` (int32) marks real
        samples. ``return_tensors`` "pt" or "np" (None: tensors in give tensors out, else numpy)."""
        return pad_features(self, processed_features, padding=padding, max_length=max_length, truncation=truncation,
                            pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=return_attention_mask,
                            return_tensors=return_tensors)

    def __call__(self, raw_audio, padding=None, truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None, sampling_rate: int | None = None) -> BatchFeature:
        """raw_audio: one clip (np.ndarray / list of floats / tensor, shape (T,) or (1, T)) or a batch (list of
        clips); float in [-1, 1] or integer PCM.

        Returns a BatchFeature with ``input_values`` and, when padding (the default), ``padding_mask`` (B, T').
        Padding (True/"longest", or "max_length" with ``max_length``) and truncation (to ``max_length``) round
        lengths up to whole hops, as transformers' extractor does. return_tensors: "pt" gives (B, 1, T') tensors,
        "np" arrays, None a list of (1, T') arrays and a numpy mask.
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
        padding = padding_strategy(padding, max_length)
        _check_tensor_type(return_tensors)

        is_batched = isinstance(raw_audio, (list, tuple)) and len(raw_audio) > 0 and isinstance(
            raw_audio[0], (np.ndarray, tuple, list, torch.Tensor))
        clips = list(raw_audio) if is_batched else [raw_audio]
        if len(clips) == 0:
            raise ValueError("raw_audio is empty: expected a clip or a non-empty list of clips")
        arrays = [self._mono_clip(clip, f"raw_audio[{i}]" if is_batched else "raw_audio")
                  for i, clip in enumerate(clips)]
        padded = pad_features(self, {"input_values": arrays}, padding=padding, max_length=max_length,
                              truncation=truncation, pad_to_multiple_of=self.hop_length,
                              return_attention_mask=padding != "do_not_pad", return_tensors="np")
        out = {}
        if padding != "do_not_pad":
            out["padding_mask"] = padded["attention_mask"]
        values = padded["input_values"]
        # one (B, 1, T) view of the padded batch for tensors (no second stack), a list of (1, T) clips otherwise
        out["input_values"] = (values[:, None, :] if return_tensors and getattr(values, "dtype", object) != object
                               else [clip[None, :] for clip in values])
        return BatchFeature(out, tensor_type=return_tensors)

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

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
