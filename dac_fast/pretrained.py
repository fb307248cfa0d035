"""``DacPreTrainedModel``, DacModel's base class, as transformers' ``PreTrainedModel`` is: weight
initialization, loading and saving (both checkpoint formats), weight norm, weight-derived caches, and the
conveniences users call (parameter counts, memory footprint, gradient checkpointing, ``push_to_hub``)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .configuration import DacConfig
from .weight_cache import clear_derived


def run_block(block: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """``block(hidden_state)``, recomputed in the backward pass instead of keeping its activations when gradient
    checkpointing is on and the model trains (as transformers checkpoints only in training mode)."""
    if getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled():
        return checkpoint(block, hidden_state, **block.checkpoint_kwargs)
    return block(hidden_state)


class DacPreTrainedModel(nn.Module):
    """Base of ``DacModel`` (which has ``config``, ``encoder.block`` and ``decoder.block``)."""

    config_class = DacConfig
    base_model_prefix = "dac"
    main_input_name = "input_values"
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self) -> None:
        """transformers' initialization (random weights; checkpoints overwrite them)."""
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def can_generate(cls) -> bool:
        """False: DAC is a codec, not a generative model (``generate`` does not exist)."""
        return False

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, as transformers' ``num_parameters`` counts them (embeddings: the codebooks)."""
        embeddings = {id(m.weight) for m in self.modules() if exclude_embeddings and isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in embeddings and (p.requires_grad or not only_trainable))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers, by default), as transformers reports it."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    @property
    def base_model(self) -> nn.Module:
        """The model itself (DAC has no task heads around a base model)."""
        return self

    def get_encoder(self) -> nn.Module:
        return self.encoder

    def get_decoder(self) -> nn.Module:
        return self.decoder

    # ------------------------------------------------------------------ gradient checkpointing
    def _checkpointed_blocks(self):
        return [*self.encoder.block, *self.decoder.block]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder and decoder block in the backward pass instead of storing its activations
        (training only; gradients are those of the unchecked run). ``gradient_checkpointing_kwargs`` go to
        ``torch.utils.checkpoint.checkpoint`` (default ``use_reentrant=False``)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for block in self._checkpointed_blocks():
            block.gradient_checkpointing = True
            block.checkpoint_kwargs = kwargs

    def gradient_checkpointing_disable(self) -> None:
        for block in self._checkpointed_blocks():
            block.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(block, "gradient_checkpointing", False) for block in self._checkpointed_blocks())

    # ------------------------------------------------------------------ hub
    def push_to_hub(self, repo_id: str, **kwargs):
        """``save_pretrained`` then upload to the Hugging Face Hub repo ``repo_id`` (needs huggingface_hub;
        ``commit_message``, ``private``, ``token``, ``revision``, ``create_pr`` as in transformers)."""
        from .hub import push_saved

        return push_saved(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ weight-derived caches
    def clear_weight_caches(self) -> None:
        """Drop everything built from the weights: polyphase and packed convolution weights, stacked and
        normalized codebooks, captured CUDA graphs (rebuilt on next use). Changes made through the parameters
        (in place under no_grad, ``load_state_dict``, ``.to()``) are seen without it; updates through ``.data``
        bump no version counter, so call it after those. ``.to()``, ``.half()``, ``.cuda()`` ... call it first,
        so no copy of the old weights outlives the move."""
        clear_derived(self)

    def _apply(self, fn, *args, **kwargs):
        self.clear_weight_caches()
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, device=None, dtype=None, torch_dtype=None,
                        device_map=None, backend=None, **kwargs) -> "DacPreTrainedModel":
        """Load a transformers-format checkpoint: a local directory (config.json + model.safetensors or
        pytorch_model.bin) or a hub id (local Hugging Face cache, or huggingface_hub when reachable).

        dtype (or transformers' older ``torch_dtype``): a torch.dtype, its name, or "auto" (the checkpoint's);
        device or transformers' ``device_map`` ("auto", a device, or {"": device}: the model is never split).
        As in transformers: ``config=`` (a DacConfig, transformers' DacConfig or a path) instead of config.json,
        ``state_dict=`` instead of the weights file (no path: both needed), ``output_loading_info=True`` (returns
        (model, {missing_keys, unexpected_keys, mismatched_keys, error_msgs}); missing tensors keep their
        initialization instead of raising), ``subfolder`` and the hub arguments revision, cache_dir,
        local_files_only, token, force_download, proxies. Other keyword arguments raise a TypeError."""
        from .loading import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, device=device, dtype=dtype,
                               torch_dtype=torch_dtype, device_map=device_map, backend=backend, **kwargs)

    @classmethod
    def from_original(cls, path, *, device=None, dtype=None, backend=None) -> "DacPreTrainedModel":
        """Load an original descript-audio-codec ``.pth`` checkpoint (weight-norm pairs folded at load)."""
        from .loading import load_original

        return load_original(cls, path, device=device, dtype=dtype, backend=backend)

    @classmethod
    def from_transformers(cls, hf_model, *, backend=None) -> "DacPreTrainedModel":
        """Convert an in-memory ``transformers.DacModel`` (weights copied, same device and dtype)."""
        from .loading import convert_transformers

        return convert_transformers(cls, hf_model, backend=backend)

    @classmethod
    def from_preset(cls, name: str, *, seed: int = 0, device=None, dtype=None, backend=None) -> "DacPreTrainedModel":
        """A model in the real shapes of preset ``name`` with seeded RANDOM weights (for tests and demos:
        it does not produce meaningful audio)."""
        from .loading import randomize_

        # ordinary tensors even inside inference_mode, as the loaders make (their weight caches track versions)
        with torch.inference_mode(False):
            model = cls(DacConfig.from_preset(name), backend=backend)
            randomize_(model, seed)
            return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write config.json, model.safetensors and preprocessor_config.json, loadable by transformers; returns
        their paths. ``state_dict=`` saves those tensors instead of the model's. ``push_to_hub=True`` then
        uploads the directory (``repo_id``, ``commit_message``, ``private``, ``token``: huggingface_hub)."""
        from .loading import save_pretrained

        return save_pretrained(self, save_directory, push_to_hub=push_to_hub, **kwargs)

    # ------------------------------------------------------------------ weight norm (training)
    def _weight_norm_modules(self):
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                yield module

    def apply_weight_norm(self) -> None:
        """Reparametrize every convolution as g * v / ||v|| (dim 0), as in the original training setup."""
        for module in self._weight_norm_modules():
            nn.utils.parametrizations.weight_norm(module)

    def remove_weight_norm(self) -> None:
        """Fold weight-norm parametrizations back into plain weights."""
        for module in self._weight_norm_modules():
            if nn.utils.parametrize.is_parametrized(module, "weight"):
                nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
