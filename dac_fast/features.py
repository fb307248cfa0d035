"""BatchFeature and sequence padding as transformers' feature extractors have them, without transformers.

``BatchFeature`` is the mapping ``DacFeatureExtractor`` returns (attribute access, ``.to(device/dtype)``,
``convert_to_tensors``); ``pad_features`` is the padding/truncation behind ``DacFeatureExtractor.pad`` and
its ``__call__``, following transformers' ``SequenceFeatureExtractor.pad`` rule for rule.
"""

from __future__ import annotations

from collections import UserDict

import numpy as np
import torch

TENSOR_TYPES = ("pt", "np")
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")


def _check_tensor_type(tensor_type) -> str | None:
    tensor_type = getattr(tensor_type, "value", tensor_type)  # transformers' TensorType enum
    if tensor_type not in (None, *TENSOR_TYPES):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")
    return tensor_type


def _as_torch(value):
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return torch.stack(list(value))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        value = np.array(value)
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else torch.tensor(value)


def _as_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray, torch.Tensor)):
        items = [_as_numpy(v) for v in value]
        if len({len(v) for v in items}) > 1:  # items of different lengths: an object array, as transformers makes
            ragged = np.empty(len(items), dtype=object)
            ragged[:] = items
            return ragged
        return np.asarray(items)  # raises, as transformers' does, for items ragged past their first axis
    return np.asarray(value)


class BatchFeature(UserDict):
    """A dict of model inputs with attribute access (``inputs.input_values``), ``.to(device or dtype)`` and
    ``convert_to_tensors("pt" | "np")``, like transformers' ``BatchFeature``."""

    def __init__(self, data=None, tensor_type=None):
        super().__init__(data)
        self.convert_to_tensors(tensor_type)

    def __getitem__(self, item):
        if not isinstance(item, str):
            raise KeyError(f"BatchFeature is indexed by input name (e.g. 'input_values'), got {item!r}")
        return self.data[item]

    def __getattr__(self, item):
        try:
            return self.__dict__["data"][item]
        except KeyError:
            raise AttributeError(f"BatchFeature has no input {item!r}") from None

    def convert_to_tensors(self, tensor_type=None) -> "BatchFeature":
        """Turn every array-like value into a torch tensor ("pt") or numpy array ("np"); None leaves them."""
        tensor_type = _check_tensor_type(tensor_type)
        if tensor_type is None:
            return self
        convert, is_done = (_as_torch, torch.is_tensor) if tensor_type == "pt" else (_as_numpy, _is_numpy)
        for key, value in self.items():
            if is_done(value) or not _is_array_like(value):
                continue
            try:
                self.data[key] = convert(value)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise ValueError(f"cannot convert {key!r} to {tensor_type} tensors ({exc}); pad the batch "
                                 "(padding=True) or pass return_tensors=None") from exc
        return self

    def to(self, *args, **kwargs) -> "BatchFeature":
        """Move the tensors to a device and/or cast the floating-point ones to a dtype (integer masks keep theirs)."""
        device = kwargs.get("device")
        if device is None and args:
            if isinstance(args[0], (str, int, torch.device)):
                device = args[0]
            elif not isinstance(args[0], torch.dtype):
                raise ValueError(f"BatchFeature.to takes a device or a dtype, got {args[0]!r}")

        def move(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(*args, **kwargs)
            if isinstance(value, torch.Tensor) and device is not None:
                return value.to(device=device, non_blocking=kwargs.get("non_blocking", False))
            if isinstance(value, (list, tuple)):
                return type(value)(move(v) for v in value)
            return value

        self.data = {k: move(v) for k, v in self.items()}
        return self


def _is_numpy(value) -> bool:
    return isinstance(value, np.ndarray)


def _is_array_like(value) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor, int, float)) or (
        isinstance(value, (list, tuple)) and (not value or not isinstance(value[0], (str, dict))))


def padding_strategy(padding, max_length) -> str:
    """transformers' padding argument as one of "longest", "max_length", "do_not_pad"."""
    padding = getattr(padding, "value", padding)  # transformers' PaddingStrategy enum
    strategy = "longest" if padding is True else "do_not_pad" if padding is False else padding
    if strategy not in PADDING_STRATEGIES:
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
    if strategy == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    return strategy


def _round_up(length: int | None, multiple: int | None) -> int | None:
    if length is None or not multiple:
        return length
    return -(-length // multiple) * multiple


def pad_features(extractor, processed_features, padding=True, max_length: int | None = None,
                 truncation: bool = False, pad_to_multiple_of: int | None = None,
                 return_attention_mask: bool | None = None, return_tensors=None) -> BatchFeature:
    """transformers' ``SequenceFeatureExtractor.pad`` for ``extractor`` (its ``model_input_names[0]``,
    ``padding_value``, ``padding_side``): truncate each item to ``max_length`` when ``truncation``, pad to the
    longest item or ``max_length``, either rounded up to ``pad_to_multiple_of``; add an int32
    ``attention_mask`` (1 for real samples) when ``return_attention_mask`` (default: the extractor's)."""
    if isinstance(processed_features, (list, tuple)) and processed_features and isinstance(
            processed_features[0], (dict, UserDict)):
        processed_features = {key: [example[key] for example in processed_features]
                              for key in processed_features[0].keys()}
    name = extractor.model_input_names[0]
    if not isinstance(processed_features, (dict, UserDict)) or name not in processed_features:
        got = list(processed_features.keys()) if isinstance(processed_features, (dict, UserDict)) \
            else type(processed_features).__name__
        raise ValueError(f"pad() needs a BatchFeature, dict or list of dicts holding {name!r}, got {got}")
    return_tensors = _check_tensor_type(return_tensors)
    strategy = padding_strategy(padding, max_length)
    if truncation and max_length is None:
        raise ValueError("truncation=True needs max_length")
    if return_attention_mask is None:
        return_attention_mask = extractor.return_attention_mask
    required = processed_features[name]
    if len(required) == 0:
        processed_features = dict(processed_features)
        if return_attention_mask:
            processed_features["attention_mask"] = []
        return BatchFeature(processed_features)
    if return_tensors is None:  # the input's kind: tensors give tensors, anything else numpy
        return_tensors = "pt" if isinstance(required[0], torch.Tensor) else "np"
    columns = {key: (_as_numpy(value) if isinstance(value[0], (int, float)) else [_as_numpy(v) for v in value])
               for key, value in processed_features.items()}
    batch_size = len(columns[name])
    if any(len(v) != batch_size for v in columns.values()):
        raise ValueError("pad(): the inputs hold different numbers of items")
    items = [{k: v[i] for k, v in columns.items()} for i in range(batch_size)]
    if truncation:
        limit = _round_up(max_length, pad_to_multiple_of)
        for item in items:
            item[name] = item[name][:limit]
            if "attention_mask" in item:
                item["attention_mask"] = item["attention_mask"][:limit]
    target = max(len(item[name]) for item in items) if strategy == "longest" else max_length
    target = _round_up(target, pad_to_multiple_of)
    outputs: dict[str, list] = {}
    for item in items:
        for key, value in _pad_item(extractor, item, name, target if strategy != "do_not_pad" else None,
                                    return_attention_mask).items():
            outputs.setdefault(key, []).append(value.astype(np.float32) if value.dtype == np.float64 else value)
    return BatchFeature(outputs, tensor_type=return_tensors)


def _pad_item(extractor, item: dict, name: str, target: int | None, return_attention_mask: bool) -> dict:
    values = item[name]
    if return_attention_mask and "attention_mask" not in item:
        item["attention_mask"] = np.ones(len(values), dtype=np.int32)
    if target is None or len(values) >= target:
        return item
    difference = target - len(values)
    if extractor.padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {extractor.padding_side!r}")
    before_after = (0, difference) if extractor.padding_side == "right" else (difference, 0)
    if return_attention_mask:
        item["attention_mask"] = np.pad(item["attention_mask"], before_after)
    widths = (before_after, (0, 0)) if extractor.feature_size > 1 else before_after
    item[name] = np.pad(values, widths, "constant", constant_values=extractor.padding_value)
    return item
