"""dac_fast: a fast, drop-in Descript Audio Codec (DAC).

``DacModel``, ``DacConfig`` and ``DacFeatureExtractor`` mirror transformers' classes; fused kernels
live in the optional compiled extension ``dac_fast._C`` (pure torch is used where it is not built).
"""

from .configuration import PRESETS, DacConfig
from .feature_extraction import DacFeatureExtractor
from .modeling import DacModel
from .outputs import DacDecoderOutput, DacEncoderOutput, DacOutput
from .batch import decode_files, encode_files, load_model
from .dacfile import DacFile

__version__ = "0.1.0"

__all__ = [
    "DacConfig",
    "DacModel",
    "DacFeatureExtractor",
    "DacOutput",
    "DacEncoderOutput",
    "DacDecoderOutput",
    "PRESETS",
    "encode_files",
    "decode_files",
    "load_model",
    "DacFile",
]
