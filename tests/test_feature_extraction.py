"""Audio in: the feature extractor's defaults, constructors and input checks, and the audio DacModel.encode takes
(integer PCM, inputs shorter than the encoder's minimum), consistent between the two."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dac_fast import DacConfig, DacFeatureExtractor, DacModel
from dac_fast.loading import randomize_
from dac_fast.tiles import encoded_frames
from tests.reference import hf_config, synth_audio

# A small model of the real structure (hop 40) for the encode checks that do not need the real shapes.
SMALL = DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 5], decoder_hidden_size=64, n_codebooks=4)


@pytest.fixture(scope="module")
def small_model():
    return randomize_(DacModel(SMALL), seed=5).eval()


@pytest.mark.parametrize("rate, hop", [(16000, 320), (24000, 320), (44100, 512), (48000, 512)])
def test_default_hop_is_the_official_models(rate, hop):
    """DacFeatureExtractor(sampling_rate=16000) once padded to 512-sample hops: the 16 kHz model's hop is 320."""
    fe = DacFeatureExtractor(sampling_rate=rate)
    assert fe.hop_length == hop
    out = fe(synth_audio(9000, rate), sampling_rate=rate, return_tensors="np")
    assert out["input_values"].shape == (1, 1, -(-9000 // hop) * hop)
    assert DacFeatureExtractor(sampling_rate=rate, hop_length=256).hop_length == 256


@pytest.mark.parametrize("name", ["16khz", "24khz", "44khz", "44khz_16kbps"])
def test_from_preset_matches_the_model(name):
    config = DacConfig.from_preset(name)
    fe = DacFeatureExtractor.from_preset(name)
    assert (fe.sampling_rate, fe.hop_length) == (config.sampling_rate, config.hop_length)
    with pytest.raises(ValueError, match="unknown preset"):
        DacFeatureExtractor.from_preset("48khz")


def test_from_config_accepts_a_model_and_from_pretrained_a_model_directory(small_model, tmp_path):
    fe = DacFeatureExtractor.from_config(small_model)
    assert (fe.sampling_rate, fe.hop_length) == (16000, 40)
    small_model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()  # a directory with the model's config.json only
    assert DacFeatureExtractor.from_pretrained(tmp_path).hop_length == 40
    fe.save_pretrained(tmp_path / "fe")
    assert DacFeatureExtractor.from_pretrained(tmp_path / "fe").to_dict() == fe.to_dict()


def test_repr_is_readable_json():
    fe = DacFeatureExtractor.from_preset("24khz")
    text = repr(fe)
    assert text.startswith("DacFeatureExtractor {")
    data = json.loads(text[len("DacFeatureExtractor "):])
    assert data["hop_length"] == 320 and data["sampling_rate"] == 24000


@pytest.mark.parametrize("dtype, offset, scale", [(np.int16, 0, 2**15), (np.int32, 0, 2**31), (np.uint8, 128, 2**7)])
def test_integer_pcm_is_scaled_in_extractor_and_encode(small_model, dtype, offset, scale):
    """Integer PCM once went through the extractor unscaled while encode rejected it: both scale it now."""
    info = np.iinfo(dtype)
    floats = synth_audio(40 * 7 + 3, 16000, seed=3)
    pcm = np.clip(np.round(floats * scale + offset), info.min, info.max).astype(dtype)
    expected = ((pcm.astype(np.float64) - offset) / scale).astype(np.float32)
    fe = DacFeatureExtractor.from_config(small_model)
    out = fe(pcm, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert torch.equal(out[0, 0, : pcm.size], torch.from_numpy(expected))
    assert out.abs().max() <= 1.0
    with torch.inference_mode():
        codes = small_model.encode(torch.from_numpy(pcm)[None, None]).audio_codes
        assert torch.equal(codes, small_model.encode(torch.from_numpy(expected)[None, None]).audio_codes)


def test_other_integer_dtypes_are_refused_in_both(small_model):
    fe = DacFeatureExtractor.from_config(small_model)
    with pytest.raises(TypeError, match="raw_audio must be float audio in \\[-1, 1\\] or integer PCM.*int64"):
        fe(np.arange(100), sampling_rate=16000)
    with pytest.raises(TypeError, match="input_values must be float audio in \\[-1, 1\\] or integer PCM.*int64"):
        small_model.encode(torch.arange(100)[None, None])


def test_channels_are_named_in_shape_errors():
    fe = DacFeatureExtractor(sampling_rate=16000)
    with pytest.raises(ValueError, match=r"raw_audio has shape \(8000, 2\): expected mono audio.*per channel"):
        fe(np.zeros((8000, 2), np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match=r"raw_audio\[1\] has shape \(2, 500\): expected mono"):
        fe([np.zeros(100, np.float32), np.zeros((2, 500), np.float32)], sampling_rate=16000)
    one_row = fe(np.ones((1, 100), np.float32), sampling_rate=16000, return_tensors="np")["input_values"]  # (1, T) is mono
    assert one_row.shape == (1, 1, 320) and one_row[0, 0, :100].min() == 1


def test_short_inputs_encode_as_the_cli_pads_them(small_model):
    """Inputs shorter than the strided convolutions need once raised a raw convolution error; they are zero-padded
    to one hop, as the CLI pads every file to whole hops. Longer inputs are untouched."""
    hop = SMALL.hop_length
    minimum = next(n for n in range(1, hop + 1) if encoded_frames(SMALL, n) >= 1)
    assert 1 < minimum <= hop
    for length in (1, 17, minimum - 1):
        x = torch.from_numpy(synth_audio(length, 16000, seed=length))[None, None]
        padded = F.pad(x, (0, hop - length))
        with torch.inference_mode():
            out = small_model.encode(x)
            assert torch.equal(out.audio_codes, small_model.encode(padded).audio_codes)
            assert out.audio_codes.shape[-1] == 1
            assert small_model(x).audio_values.shape == (1, length)
        x.requires_grad_(True)  # the training path too
        small_model(x).audio_values.sum().backward()
        assert x.grad.shape == x.shape


def test_shortest_input_matches_transformers():
    """At the minimum length nothing is padded: the codes are transformers'."""
    transformers = pytest.importorskip("transformers")
    hf = randomize_(transformers.DacModel(hf_config(SMALL)), seed=3).eval()
    ours = DacModel.from_transformers(hf)
    minimum = next(n for n in range(1, 400) if encoded_frames(ours.config, n) >= 1)
    x = torch.from_numpy(synth_audio(minimum, 16000, seed=1))[None, None]
    with torch.inference_mode():
        assert torch.equal(ours.encode(x).audio_codes, hf.encode(x).audio_codes)
        with pytest.raises(RuntimeError):  # one sample less is too short for transformers
            hf.encode(x[..., :-1])
        assert ours.encode(x[..., :-1]).audio_codes.shape == (1, 4, 1)
