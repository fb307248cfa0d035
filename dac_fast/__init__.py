"""dac_fast: a fast, drop-in Descript Audio Codec (DAC).

``DacModel``, ``DacConfig`` and ``DacFeatureExtractor`` mirror transformers' classes; fused kernels
live in the optional compiled extension ``dac_fast._C`` (pure torch is used where it is not built).

The public names are imported on first use (PEP 562), so ``import dac_fast.io`` or a Ray read
task does not pay for importing torch; ``from dac_fast import DacModel`` works as usual.
"""

from ._lazy import lazy_module

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
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
