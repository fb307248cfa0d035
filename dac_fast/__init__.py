"""dac_fast: a fast, drop-in Descript Audio Codec (DAC).

``DacModel``, ``DacConfig`` and ``DacFeatureExtractor`` mirror transformers' classes; fused kernels
live in the optional compiled extension ``dac_fast._C`` (pure torch is used where it is not built).

The public names are imported on first use (PEP 562), so ``import dac_fast.io`` or a Ray read
task does not pay for importing torch; ``from dac_fast import DacModel`` works as usual.
"""

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "DacConfig": "configuration",
    "PRESETS": "configuration",
    "DacModel": "modeling",
    "DacFeatureExtractor": "feature_extraction",
    "DacOutput": "outputs",
    "DacEncoderOutput": "outputs",
    "DacDecoderOutput": "outputs",
    "encode_files": "batch",
    "decode_files": "batch",
    "load_model": "batch",
    "DacFile": "dacfile",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
