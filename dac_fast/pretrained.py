"""The conveniences transformers' ``PreTrainedModel`` gives ``DacModel`` that users call: parameter counts,
memory footprint, gradient checkpointing, ``push_to_hub``, class attributes."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .configuration import DacConfig


def run_block(block: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """``block(hidden_state)``, recomputed in the backward pass instead of keeping its activations when gradient
    checkpointing is on and the model trains (as transformers checkpoints only in training mode)."""
    if getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled():
        return checkpoint(block, hidden_state, **block.checkpoint_kwargs)
    return block(hidden_state)


class PreTrainedConveniences:
    """Mixed into ``DacModel`` (an ``nn.Module`` with ``encoder.block`` and ``decoder.block``)."""

    config_class = DacConfig
    base_model_prefix = "dac"
    main_input_name = "input_values"
    supports_gradient_checkpointing = True

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
