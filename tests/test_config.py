"""DacConfig and DacFeatureExtractor against transformers'."""

import json

import numpy as np
import pytest
import torch

from dac_fast import PRESETS, DacConfig, DacFeatureExtractor
from tests.reference import HF_FIELDS, hf_config, synth_audio

transformers = pytest.importorskip("transformers")


def test_defaults_match_transformers():
    ours, ref = DacConfig(), transformers.DacConfig()
    for field in HF_FIELDS + ("hidden_size", "hop_length", "frame_rate"):
        assert np.array(getattr(ours, field)).tolist() == np.array(getattr(ref, field)).tolist(), field
    assert list(ours.upsampling_ratios) == list(ref.upsampling_ratios)


@pytest.mark.parametrize("name", ["16khz", "24khz", "44khz"])
def test_presets_derived_attributes(name):
    ours = DacConfig.from_preset(name)
    ref = hf_config(ours)
    assert (ours.hidden_size, ours.hop_length, ours.frame_rate) == (ref.hidden_size, ref.hop_length, ref.frame_rate)
    expected = {"16khz": (320, 50), "24khz": (320, 75), "44khz": (512, 87)}[name]
    assert (ours.hop_length, ours.frame_rate) == expected


def test_16kbps_preset_is_representable():
    cfg = DacConfig.from_preset("44khz_16kbps")
    assert cfg.hidden_size == 128 and cfg.n_codebooks == 18 and cfg.hop_length == 512
    assert DacConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


def test_json_round_trip_and_stale_keys(tmp_path):
    cfg = DacConfig.from_preset("24khz")
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(hop_length=512, transformers_version="5.18.0", torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = DacConfig.from_pretrained(tmp_path)
    assert loaded == cfg and loaded.hop_length == 320
    ref = transformers.DacConfig.from_pretrained(tmp_path)
    assert ref.n_codebooks == 32  # transformers reads our file (it also believes the stale hop_length)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset '48khz'"):
        DacConfig.from_preset("48khz")
    with pytest.raises(TypeError, match="unexpected keys \\['n_layers'\\]"):
        DacConfig(n_layers=3)
    with pytest.raises(ValueError, match="codebook_size must be a power of 2"):
        DacConfig(codebook_size=1000)
    assert set(PRESETS) == {"16khz", "24khz", "44khz", "44khz_16kbps"}


# ----------------------------------------------------------------------------- feature extractor
@pytest.mark.parametrize("batched", [False, True])
def test_feature_extractor_matches_transformers(batched):
    clips = [synth_audio(1001, 16000, 1), synth_audio(777, 16000, 2).astype(np.float64)]
    raw = clips if batched else clips[0]
    ours = DacFeatureExtractor(sampling_rate=16000, hop_length=320)(raw, sampling_rate=16000, return_tensors="pt")
    ref = transformers.DacFeatureExtractor(sampling_rate=16000, hop_length=320)(
        raw, sampling_rate=16000, return_tensors="pt")
    assert ours["input_values"].shape == (2 if batched else 1, 1, 1280)
    assert torch.equal(ours["input_values"], ref["input_values"])
    assert torch.equal(ours["padding_mask"], ref["padding_mask"])
    assert ours["input_values"].dtype == torch.float32


def test_feature_extractor_unpadded_lists():
    clips = [synth_audio(1001, 16000, 1), synth_audio(777, 16000, 2)]
    out = DacFeatureExtractor()(clips, padding=False, sampling_rate=16000)
    assert [v.shape for v in out["input_values"]] == [(1, 1001), (1, 777)]


def test_feature_extractor_errors(tmp_path):
    fe = DacFeatureExtractor(sampling_rate=16000, hop_length=320)
    with pytest.raises(ValueError, match="sampling_rate 44100 does not match.*16000"):
        fe(np.zeros(100, np.float32), sampling_rate=44100)
    with pytest.raises(ValueError, match="mono audio"):
        fe([np.zeros((2, 100), np.float32)], sampling_rate=16000)
    with pytest.raises(ValueError, match="empty"):
        fe(np.zeros(0, np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match="padding and truncation"):
        fe(np.zeros(10, np.float32), padding=True, truncation=True, sampling_rate=16000)
    with pytest.raises(ValueError, match="feature_size must be 1"):
        DacFeatureExtractor(feature_size=2)


def test_feature_extractor_from_pretrained(tmp_path):
    ref = transformers.DacFeatureExtractor(sampling_rate=24000, hop_length=320)
    ref.save_pretrained(tmp_path)
    fe = DacFeatureExtractor.from_pretrained(tmp_path)
    assert (fe.sampling_rate, fe.hop_length) == (24000, 320)
