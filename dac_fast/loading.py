"""Checkpoint loading and saving: transformers directories and hub ids, original ``.pth`` files,
in-memory transformers models; weight-norm folding; seeded random weights for tests and demos."""

from __future__ import annotations

import functools

import json
import math
import os
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from .configuration import CONFIG_NAME, TRANSFORMERS_FIELDS, DacConfig
from .feature_extraction import DacFeatureExtractor
from .hub import SAFETENSORS_NAME, TORCH_WEIGHTS_NAME, check_hub_kwargs, resolve_directory
from .hub import save_directory as directory_for
from .io import give_normal_permissions


# The three ways a weight-normalized convolution's weight is stored: (magnitude g, direction v) suffixes.
_WEIGHT_NORM_STYLES = (
    (".weight_g", ".weight_v"),  # torch.nn.utils.weight_norm (original DAC releases)
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),  # newer torch
)


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor], device=None) -> dict[str, torch.Tensor]:
    """Replace every (g, v) pair by ``weight = g * v / ||v||`` (norm over all dims but 0), computed in fp32
    on ``device``; plain weights pass through. For a transposed convolution dim 0 is its input-channel axis,
    which is also the axis torch's weight_norm(dim=0) keeps, so one formula serves both."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for g_suffix, v_suffix in _WEIGHT_NORM_STYLES:
            for role, suffix in (("g", g_suffix), ("v", v_suffix)):
                if key.endswith(suffix):
                    pending.setdefault(key[: -len(suffix)], {})[role] = value
                    break
            else:
                continue
            break
        else:
            out[key] = value
    for prefix, pair in pending.items():
        if set(pair) != {"g", "v"}:
            missing = "weight_v (direction)" if "v" not in pair else "weight_g (magnitude)"
            raise ValueError(f"checkpoint has half a weight-norm pair at {prefix!r}: {missing} is missing")
        g = pair["g"].to(device=device, dtype=torch.float32)
        v = pair["v"].to(device=device, dtype=torch.float32)
        out[prefix + ".weight"] = torch._weight_norm(v, g, 0)
    return out


# ----------------------------------------------------------------------------- original checkpoints
def original_to_transformers_key(key: str, n_blocks: int) -> str:
    """Map one original descript-audio-codec parameter name to transformers' name.

    The map: ``encoder.block.0`` -> ``encoder.conv1``; ``encoder.block.{i}.block.{j}.block.{0..3}`` ->
    ``encoder.block.{i-1}.res_unit{j+1}.{snake1, conv1, snake2, conv2}``; ``encoder.block.{i}.block.{3, 4}`` ->
    ``encoder.block.{i-1}.{snake1, conv1}``; ``encoder.block.{n+1, n+2}`` -> ``encoder.{snake1, conv2}``;
    ``decoder.model.0`` -> ``decoder.conv1``; ``decoder.model.{i}.block.{0, 1}`` -> ``decoder.block.{i-1}.{snake1,
    conv_t1}``; ``decoder.model.{i}.block.{2, 3, 4}.block.{0..3}`` -> ``decoder.block.{i-1}.res_unit{1, 2, 3}.{...}``;
    ``decoder.model.{n+1, n+2}`` -> ``decoder.{snake1, conv2}`` (n+3 is the tanh); ``quantizer.*`` unchanged.
    """
    sub = "snake1", "conv1", "snake2", "conv2"
    rules = [
        (r"^encoder\.block\.0\.", lambda m: "encoder.conv1."),
        (r"^encoder\.block\.(\d+)\.block\.([012])\.block\.([0123])\.",
         lambda m: f"encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{sub[int(m[3])]}."),
        (r"^encoder\.block\.(\d+)\.block\.3\.", lambda m: f"encoder.block.{int(m[1]) - 1}.snake1."),
        (r"^encoder\.block\.(\d+)\.block\.4\.", lambda m: f"encoder.block.{int(m[1]) - 1}.conv1."),
        (rf"^encoder\.block\.{n_blocks + 1}\.", lambda m: "encoder.snake1."),
        (rf"^encoder\.block\.{n_blocks + 2}\.", lambda m: "encoder.conv2."),
        (r"^decoder\.model\.0\.", lambda m: "decoder.conv1."),
        (r"^decoder\.model\.(\d+)\.block\.0\.", lambda m: f"decoder.block.{int(m[1]) - 1}.snake1."),
        (r"^decoder\.model\.(\d+)\.block\.1\.", lambda m: f"decoder.block.{int(m[1]) - 1}.conv_t1."),
        (r"^decoder\.model\.(\d+)\.block\.([234])\.block\.([0123])\.",
         lambda m: f"decoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) - 1}.{sub[int(m[3])]}."),
        (rf"^decoder\.model\.{n_blocks + 1}\.", lambda m: "decoder.snake1."),
        (rf"^decoder\.model\.{n_blocks + 2}\.", lambda m: "decoder.conv2."),
    ]
    if key.startswith("quantizer."):
        return key
    # The last two encoder/decoder entries share the block pattern's prefix; match them first.
    for pattern, repl in rules[4:6] + rules[:4] + rules[10:] + rules[6:10]:
        m = re.match(pattern, key)
        if m:
            return repl(m) + key[m.end():]
    raise ValueError(f"unrecognized parameter {key!r} in original checkpoint")


def config_from_original_kwargs(kwargs: Mapping) -> DacConfig:
    """DacConfig from the ``metadata["kwargs"]`` of an original checkpoint (DAC.__init__ arguments)."""
    encoder_rates = list(kwargs.get("encoder_rates", [2, 4, 8, 8]))
    decoder_rates = list(kwargs.get("decoder_rates", encoder_rates[::-1]))
    if decoder_rates != encoder_rates[::-1]:
        raise ValueError(f"decoder_rates {decoder_rates} must be encoder_rates {encoder_rates} reversed")
    codebook_dim = kwargs.get("codebook_dim", 8)
    if isinstance(codebook_dim, (list, tuple)):
        if len(set(codebook_dim)) != 1:
            raise ValueError(f"per-codebook dimensions {codebook_dim} are not supported")
        codebook_dim = codebook_dim[0]
    encoder_dim = int(kwargs.get("encoder_dim", 64))
    latent_dim = kwargs.get("latent_dim")
    if latent_dim is not None and int(latent_dim) == encoder_dim * 2 ** len(encoder_rates):
        latent_dim = None
    return DacConfig(
        encoder_hidden_size=encoder_dim,
        downsampling_ratios=encoder_rates,
        decoder_hidden_size=int(kwargs.get("decoder_dim", 1536)),
        n_codebooks=int(kwargs.get("n_codebooks", 9)),
        codebook_size=int(kwargs.get("codebook_size", 1024)),
        codebook_dim=int(codebook_dim),
        quantizer_dropout=float(kwargs.get("quantizer_dropout", 0.0)),
        sampling_rate=int(kwargs.get("sample_rate", 44100)),
        hidden_size=latent_dim,
    )


def load_original(cls, path, *, device=None, dtype=None, backend=None, weights_only: bool = True):
    """Load an original ``.pth``: ``{"state_dict": ..., "metadata": {"kwargs": {...}}}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"original checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # pickle refused by weights_only, or not a torch file
        raise ValueError(
            f"cannot read {path!r} as an original DAC checkpoint ({type(exc).__name__}: {exc}); if the file is "
            "trusted and holds pickled objects besides tensors, pass weights_only=False"
        ) from exc
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path!r} is not an original DAC checkpoint: expected a dict with 'state_dict' and 'metadata'")
    kwargs = (checkpoint.get("metadata") or {}).get("kwargs") or {}
    config = config_from_original_kwargs(kwargs)
    n_blocks = len(config.downsampling_ratios)
    dtype = resolve_dtype(dtype, checkpoint_dtype=lambda: state_dict_dtype(checkpoint["state_dict"]))
    folded = fold_weight_norm(checkpoint["state_dict"], device=device)
    state_dict = {original_to_transformers_key(k, n_blocks): v for k, v in folded.items()}
    return build_model(cls, config, state_dict, device=device, dtype=dtype, backend=backend, source=path)


# ----------------------------------------------------------------------------- transformers checkpoints
def load_state_dict_file(directory: str) -> dict[str, torch.Tensor]:
    st = os.path.join(directory, SAFETENSORS_NAME)
    pt = os.path.join(directory, TORCH_WEIGHTS_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {TORCH_WEIGHTS_NAME} in {directory!r}")


def resolve_dtype(dtype, torch_dtype=None, *, checkpoint_dtype=None):
    """The dtype to load in, from transformers' spellings: a torch.dtype, its name ("bfloat16"), or "auto" (the
    checkpoint's: ``dtype`` in config.json, else its first floating-point tensor's). None keeps float32.
    ``torch_dtype`` is transformers' older name for ``dtype``."""
    if callable(checkpoint_dtype):  # read the checkpoint at most once, also when dtype and torch_dtype are both "auto"
        checkpoint_dtype = functools.cache(checkpoint_dtype)
    if torch_dtype is not None:
        if dtype is not None and resolve_dtype(dtype, checkpoint_dtype=checkpoint_dtype) != resolve_dtype(
                torch_dtype, checkpoint_dtype=checkpoint_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass only dtype")
        dtype = torch_dtype
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype == "auto":
        return checkpoint_dtype() if callable(checkpoint_dtype) else checkpoint_dtype
    named = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    raise ValueError(
        f"dtype must be a floating-point torch.dtype, its name (e.g. 'float16', 'bfloat16') or 'auto', got {dtype!r}"
    )


def resolve_device(device=None, device_map=None):
    """The one device to load on, from ``device`` or transformers' ``device_map``: a device (string, torch.device
    or CUDA index), "auto" (the first GPU if there is one, else the CPU) or {"": device}. The model is small and
    is never split across devices."""
    if device_map is None:
        return device
    if isinstance(device_map, Mapping):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map {device_map!r} splits the model; dac_fast places the whole model on one "
                             "device: pass device_map={'': device} or a device")
        device_map = devices.pop()
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        mapped = torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map must be a device, 'auto' or {{'': device}}, got {device_map!r}") from exc
    if device is not None and torch.device(device) != mapped:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree: pass only one")
    return mapped


def config_dtype(directory: str | None):
    """The ``dtype`` (or older ``torch_dtype``) that transformers records in config.json, or None."""
    if directory is None or not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return None
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        data = json.load(f)
    name = data.get("dtype") or data.get("torch_dtype")
    return resolve_dtype(name) if isinstance(name, str) else None


def state_dict_dtype(state_dict: Mapping[str, torch.Tensor]):
    """The first floating-point tensor's dtype (transformers' rule for dtype="auto")."""
    return next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)


def as_config(config) -> DacConfig:
    """``config=`` as transformers takes it: a DacConfig (ours or transformers', read through to_dict) or a path."""
    if isinstance(config, DacConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return DacConfig.from_pretrained(config)
    if callable(getattr(config, "to_dict", None)):
        return DacConfig.from_dict(config.to_dict())
    raise TypeError(f"config must be a DacConfig or a path to a config.json, got {type(config).__name__}")


def load_pretrained(cls, path_or_id=None, *, device=None, dtype=None, torch_dtype=None, device_map=None,
                    backend=None, config=None, state_dict=None, output_loading_info: bool = False, **hub_kwargs):
    check_hub_kwargs(hub_kwargs)
    device = resolve_device(device, device_map)
    if path_or_id is None and (config is None or state_dict is None):
        raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=; otherwise pass a "
                         "directory or hub id")
    directory = None if path_or_id is None else resolve_directory(path_or_id, **hub_kwargs)
    config = DacConfig.from_pretrained(directory) if config is None else as_config(config)
    stored = load_state_dict_file(directory) if state_dict is None else state_dict
    dtype = resolve_dtype(dtype, torch_dtype,
                          checkpoint_dtype=lambda: config_dtype(directory) or state_dict_dtype(stored))
    folded = fold_weight_norm(stored, device=device)
    source = directory or "state_dict"
    if not output_loading_info:
        return build_model(cls, config, folded, device=device, dtype=dtype, backend=backend, source=source)
    return build_model_reporting(cls, config, folded, device=device, dtype=dtype, backend=backend, source=source)


def build_model_reporting(cls, config: DacConfig, state_dict, *, device=None, dtype=None, backend=None, source=""):
    """(model, loading info) as transformers' ``output_loading_info=True`` gives them: missing tensors keep
    their initialization and unexpected ones are skipped (both listed); mis-shaped ones still raise."""
    with torch.inference_mode(False):
        model = cls(config, backend=backend).to(device=device or "cpu")
        check_state_dict(model, state_dict, source, shapes_only=True)
        missing, unexpected, _ = state_dict_differences(model, state_dict)
        model.load_state_dict(state_dict, strict=False)
        if dtype is not None:
            model = model.to(dtype=dtype)
    info = {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": [], "error_msgs": []}
    return model.eval(), info


def convert_transformers(cls, hf_model, *, backend=None):
    hf_config = hf_model.config
    config = DacConfig(**{f: getattr(hf_config, f) for f in TRANSFORMERS_FIELDS})
    param = next(hf_model.parameters())
    state_dict = fold_weight_norm(hf_model.state_dict(), device=param.device)
    return build_model(cls, config, state_dict, device=param.device, dtype=param.dtype, backend=backend,
                       source="transformers model")


def build_model(cls, config: DacConfig, state_dict, *, device=None, dtype=None, backend=None, source=""):
    """Instantiate without random init, check the state dict names and shapes, load it, cast, eval().

    The parameters are ordinary tensors even when loading inside ``torch.inference_mode()`` (a common serving
    pattern): inference tensors could not be trained later, and they track no version counter, so weight
    caches keyed by it (the polyphase upsampling's) would have to be rebuilt at every call."""
    with torch.inference_mode(False):
        with torch.device("meta"):
            model = cls(config, backend=backend)
        check_state_dict(model, state_dict, source)
        model = model.to_empty(device=device or "cpu")
        model.load_state_dict(state_dict, strict=True)
        if dtype is not None:
            model = model.to(dtype=dtype)
    return model.eval()


def state_dict_differences(model: nn.Module, state_dict: Mapping[str, torch.Tensor]):
    """(missing, unexpected, mis-shaped) tensor names of ``state_dict`` for ``model``, each sorted."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    return (sorted(set(expected) - set(got)), sorted(set(got) - set(expected)),
            sorted(k for k in set(expected) & set(got) if expected[k] != got[k]))


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "",
                     shapes_only: bool = False) -> None:
    """Raise a ValueError naming every missing, unexpected and mis-shaped tensor (``shapes_only``: mis-shaped)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = []
    missing, unexpected, shapes = state_dict_differences(model, state_dict)

    def listing(keys, describe=str):
        shown = ", ".join(describe(k) for k in keys[:10])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")

    if missing and not shapes_only:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected and not shapes_only:
        problems.append(f"unexpected tensors: {listing(unexpected)}")
    if shapes:
        problems.append("mis-shaped tensors: " + listing(shapes, lambda k: f"{k} (expected {expected[k]}, got {got[k]})"))
    if problems:
        where = f" in {source}" if source else ""
        raise ValueError(f"checkpoint does not match the model configuration{where}: " + "; ".join(problems))


def save_pretrained(model, save_directory, push_to_hub: bool = False, state_dict=None, **hub_kwargs) -> list[str]:
    """Write the three files (config, weights, preprocessor config); returns their paths."""
    from safetensors.torch import save_file

    with directory_for(save_directory, push_to_hub, hub_kwargs) as directory:
        model.config.save_pretrained(directory)
        tensors = fold_weight_norm(model.state_dict() if state_dict is None else state_dict)
        state_dict = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        weights = os.path.join(directory, SAFETENSORS_NAME)
        save_file(state_dict, weights, metadata={"format": "pt"})
        give_normal_permissions(weights)  # safetensors writes 0600: unreadable to others sharing the checkpoint
        return [os.path.join(directory, CONFIG_NAME), weights,
                *DacFeatureExtractor.from_config(model.config).save_pretrained(directory)]


# ----------------------------------------------------------------------------- random weights
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights in the real shapes, away from init values (alphas != 1, biases != 0), scaled
    so activations stay O(1) through the network: for tests and demos, not for listening."""
    gen = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, std: float = 1.0, mean: float = 0.0):
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    # Gains below 1 and a damped residual branch keep the decoder's sensitivity to rounding near that of a
    # trained model (unit gains make it amplify input perturbations about 1000-fold) and its output unsaturated.
    for name, module in model.named_modules():
        if isinstance(module, nn.ConvTranspose1d):
            fan_in = module.in_channels * module.kernel_size[0] / module.stride[0]
            fill(module.weight, 0.7 / math.sqrt(fan_in))
            fill(module.bias, 0.05)
        elif isinstance(module, nn.Conv1d):
            fan_in = module.in_channels * module.kernel_size[0]
            if name.endswith("conv2") and "res_unit" in name:
                gain = 0.25
            elif name == "decoder.conv2":
                gain = 0.3
            else:
                gain = 0.7
            fill(module.weight, gain / math.sqrt(fan_in))
            fill(module.bias, 0.05)
        elif isinstance(module, nn.Embedding):
            fill(module.weight)
        elif hasattr(module, "alpha") and isinstance(module.alpha, nn.Parameter):
            module.alpha.copy_(torch.rand(module.alpha.shape, generator=gen) * 1.5 + 0.5)
    return model
