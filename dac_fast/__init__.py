"""dac_fast: a fast, drop-in Descript Audio Codec (DAC)."""

__version__ = "0.1.0"
