"""DacConfig: transformers' DacConfig fields and derived attributes, without transformers."""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

from .hub import CONFIG_NAME, HUB_KWARGS, push_saved, resolve_directory
from .hub import save_directory as directory_for

# Keys transformers writes into config.json that describe nothing we need (or are stale, like
# the hop_length of 512 some hub files carry for 16/24 kHz models): read and ignored.
_IGNORED_KEYS = {
    "hop_length", "upsampling_ratios", "frame_rate", "architectures", "model_type",
    "transformers_version", "torch_dtype", "dtype", "_name_or_path", "output_hidden_states",
    "output_attentions", "use_cache", "id2label", "label2id", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "tie_word_embeddings", "_attn_implementation_autoset",
}


# The fields transformers' DacConfig reads (hidden_size is derived unless given, as in transformers).
TRANSFORMERS_FIELDS = (
    "encoder_hidden_size", "downsampling_ratios", "decoder_hidden_size", "n_codebooks", "codebook_size",
    "codebook_dim", "quantizer_dropout", "commitment_loss_weight", "codebook_loss_weight", "sampling_rate",
    "hidden_size",
)


class DacConfig:
    """Configuration of a DAC model; same fields and defaults as ``transformers.DacConfig``.

    ``hidden_size`` is the quantizer input (latent) width; ``None`` means
    ``encoder_hidden_size * 2**len(downsampling_ratios)``, and a given value overrides it, as in transformers
    (128 for the original 44 kHz 16 kbps model). ``latent_dim``, the original package's name, is accepted
    as an alias when reading; files are written with ``hidden_size``.
    """

    model_type = "dac"

    def __init__(
        self,
        encoder_hidden_size: int = 64,
        downsampling_ratios: list[int] | tuple[int, ...] = (2, 4, 8, 8),
        decoder_hidden_size: int = 1536,
        n_codebooks: int = 9,
        codebook_size: int = 1024,
        codebook_dim: int = 8,
        quantizer_dropout: float = 0.0,
        commitment_loss_weight: float = 0.25,
        codebook_loss_weight: float = 1.0,
        sampling_rate: int = 16000,
        hidden_size: int | None = None,
        latent_dim: int | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        unknown = set(kwargs) - _IGNORED_KEYS
        if unknown:
            raise TypeError(f"DacConfig got unexpected keys {sorted(unknown)}")
        self.encoder_hidden_size = int(encoder_hidden_size)
        self.downsampling_ratios = [int(r) for r in downsampling_ratios]
        self.decoder_hidden_size = int(decoder_hidden_size)
        self.n_codebooks = int(n_codebooks)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim)
        self.quantizer_dropout = quantizer_dropout
        self.commitment_loss_weight = float(commitment_loss_weight)
        self.codebook_loss_weight = float(codebook_loss_weight)
        self.sampling_rate = int(sampling_rate)
        if latent_dim is not None and hidden_size is not None and int(latent_dim) != int(hidden_size):
            raise ValueError(
                f"hidden_size={hidden_size} and its alias latent_dim={latent_dim} disagree: pass only hidden_size")
        width = hidden_size if hidden_size is not None else latent_dim
        self._hidden_size = None if width is None else int(width)
        self.return_dict = bool(return_dict)
        self._validate()

    def _validate(self) -> None:
        if not self.downsampling_ratios or any(r < 1 for r in self.downsampling_ratios):
            raise ValueError(f"downsampling_ratios must be positive integers, got {self.downsampling_ratios}")
        for name in ("encoder_hidden_size", "decoder_hidden_size", "n_codebooks", "codebook_size",
                     "codebook_dim", "sampling_rate", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if self.decoder_hidden_size % 2 ** len(self.downsampling_ratios):
            raise ValueError("decoder_hidden_size must be divisible by 2**len(downsampling_ratios)")

    # Derived attributes, computed as transformers does (never read from a file).
    @property
    def upsampling_ratios(self) -> list[int]:
        return self.downsampling_ratios[::-1]

    @property
    def hidden_size(self) -> int:
        if self._hidden_size is not None:
            return self._hidden_size
        return self.encoder_hidden_size * 2 ** len(self.downsampling_ratios)

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        self._hidden_size = int(value)

    @property
    def hop_length(self) -> int:
        return math.prod(self.downsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    # Serialization
    def to_dict(self) -> dict[str, Any]:
        out = {
            "encoder_hidden_size": self.encoder_hidden_size,
            "downsampling_ratios": list(self.downsampling_ratios),
            "decoder_hidden_size": self.decoder_hidden_size,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "codebook_dim": self.codebook_dim,
            "quantizer_dropout": self.quantizer_dropout,
            "commitment_loss_weight": self.commitment_loss_weight,
            "codebook_loss_weight": self.codebook_loss_weight,
            "sampling_rate": self.sampling_rate,
            # derived keys transformers writes too; its DacConfig reads hidden_size back as the latent width
            "hidden_size": self.hidden_size,
            "hop_length": self.hop_length,
            "upsampling_ratios": self.upsampling_ratios,
            "model_type": self.model_type,
            "architectures": ["DacModel"],
        }
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What transformers writes to config.json for a DAC model: every DAC field (none is left out as a
        default), which is ``to_dict()``."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "DacConfig":
        """The config ``config_dict`` describes (``kwargs`` override it); transformers' generic keys are ignored."""
        return cls(**{**config_dict, **kwargs})

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set fields from a dict, as transformers' ``update`` does; unknown names raise a TypeError."""
        current = {**self.to_dict(), "return_dict": self.return_dict}
        if self._hidden_size is None:  # still derived: follows a new encoder_hidden_size or ratios
            del current["hidden_size"]
        merged = DacConfig.from_dict({**current, **config_dict})  # validates the result before changing self
        self.__dict__.update(merged.__dict__)

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    def to_json_string(self, use_diff: bool = True) -> str:
        """``use_diff`` is accepted for transformers' signature; the diff dict is the whole dict (to_diff_dict)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``config.json``; ``push_to_hub=True`` then uploads the directory (huggingface_hub)."""
        with directory_for(save_directory, push_to_hub, kwargs) as directory:
            self.to_json_file(os.path.join(directory, CONFIG_NAME))

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload ``config.json`` to the hub repo ``repo_id`` (needs huggingface_hub)."""
        return push_saved(self, repo_id, **kwargs)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike, **kwargs) -> "DacConfig":
        """The config in ``json_file``; ``kwargs`` override its fields."""
        with open(json_file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DacConfig":
        """Read ``config.json`` from a directory, a hub id or the file itself. ``subfolder`` and the hub arguments
        (``revision``, ``cache_dir``, ``local_files_only``, ``force_download``, ``token``) as in transformers;
        other keyword arguments override fields."""
        path = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        if not os.path.isfile(path):
            path = os.path.join(resolve_directory(path, **hub_kwargs), CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}")
        return cls.from_json_file(path, **kwargs)

    @classmethod
    def from_preset(cls, name: str) -> "DacConfig":
        """One of the official checkpoints' configurations: ``16khz``, ``24khz``, ``44khz``, ``44khz_16kbps``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def copy(self) -> "DacConfig":
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DacConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"DacConfig({json.dumps(self.to_dict(), sort_keys=True)})"


PRESETS: dict[str, dict[str, Any]] = {
    "16khz": dict(sampling_rate=16000, downsampling_ratios=[2, 4, 5, 8], n_codebooks=12),
    "24khz": dict(sampling_rate=24000, downsampling_ratios=[2, 4, 5, 8], n_codebooks=32),
    "44khz": dict(sampling_rate=44100, downsampling_ratios=[2, 4, 8, 8], n_codebooks=9),
    "44khz_16kbps": dict(sampling_rate=44100, downsampling_ratios=[2, 4, 8, 8], n_codebooks=18, hidden_size=128),
}


def hop_length_for_rate(sampling_rate: int) -> int | None:
    """The hop length of the official models at ``sampling_rate`` (320 at 16 and 24 kHz, 512 at 44.1 kHz), or
    None for a rate no preset has."""
    hops = {DacConfig.from_preset(name).hop_length for name, preset in PRESETS.items()
            if preset["sampling_rate"] == sampling_rate}
    return hops.pop() if len(hops) == 1 else None


def n_quantizers_problem(n_quantizers, n_codebooks: int | None) -> str | None:
    """Why ``n_quantizers`` is not a codebook count for a model of ``n_codebooks`` codebooks (None: unknown),
    or None when it is one. One wording for ``DacModel.encode`` and the file tools."""
    if (isinstance(n_quantizers, bool) or not isinstance(n_quantizers, int) or n_quantizers < 1
            or (n_codebooks and n_quantizers > n_codebooks)):
        limit = f"in [1, {n_codebooks}] (the model's codebooks)" if n_codebooks else ">= 1"
        return f"must be an integer {limit}, got {n_quantizers!r}"
    return None
