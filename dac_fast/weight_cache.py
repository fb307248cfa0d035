"""Values derived from a model's weights (stacked, normalized, packed, polyphase weights; captured graphs), cached
per weight version: rebuilt when a weight changes in place, moves or is reloaded."""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from . import ops


def tensors_key(tensors):
    """What identifies ``tensors`` for a cache built from them: versions, storage addresses, dtype and device;
    None where they cannot be tracked (under torch.compile/export; inference tensors, whose in-place updates
    bump no version) or an autograd graph needs them."""
    if torch.compiler.is_compiling() or ops.needs_grad(*tensors) or any(t.is_inference() for t in tensors):
        return None
    return tuple((t._version, t.data_ptr()) for t in tensors) + (tensors[0].dtype, tensors[0].device)


def derived_from(owner: nn.Module, name: str, tensors, build, store: dict | None = None, untracked=None):
    """``build()``, a value computed from ``tensors`` (e.g. stacked or normalized weights), cached under ``name``
    in ``owner``'s ``_derived`` dict until one of them changes: an in-place update (load_state_dict, ``w.mul_()`` under
    no_grad) bumps its version, ``.to()``/``.half()`` give it new storage. The entry keeps the tensors it was
    built from alive, so their addresses cannot be reused by other weights while it exists (a model copied or
    unpickled carries entries naming storages that are not its own: they never match). Entries hold ordinary
    tensors only (built outside inference mode, without autograd), so the model still deep-copies and pickles;
    values that cannot be copied go to a ``store`` beside the module instead. Not cached where ``tensors_key``
    is None: then ``untracked()`` if given (for values too costly to build at every call), else ``build()``.
    Updates through ``.data`` bump no version and are not seen: call ``DacModel.clear_weight_caches()`` after
    them."""
    key = tensors_key(tensors)
    if key is None:
        return build() if untracked is None else untracked()
    store = owner.__dict__.setdefault("_derived", {}) if store is None else store
    entry = store.get(name)
    if entry is not None and entry[0] == key and all(a.data_ptr() == b.data_ptr() for a, b in zip(entry[1], tensors)):
        return entry[2]
    with torch.inference_mode(False), torch.no_grad():
        value = build()
        sources = [t.detach() for t in tensors]
    store[name] = (key, sources, value)
    return value


# Stores beside the modules rather than on them, module -> {name: entry}, for values that cannot be deep-copied or
# pickled (oneDNN weights, CUDA graphs): a copied or unpickled model builds its own.
_SIDE_STORES: list[weakref.WeakKeyDictionary] = []


def side_store() -> weakref.WeakKeyDictionary:
    """A new store for ``derived_from(..., store=side_store().setdefault(module, {}))``, cleared by
    ``clear_derived`` with the modules' own entries."""
    store = weakref.WeakKeyDictionary()
    _SIDE_STORES.append(store)
    return store


def clear_derived(root: nn.Module) -> None:
    """Drop every value derived from the weights of ``root`` and its submodules."""
    for module in root.modules():
        module.__dict__.pop("_derived", None)
        for store in _SIDE_STORES:
            store.pop(module, None)
