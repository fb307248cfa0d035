"""Drop-in by transformers' own DAC behaviours: config keys and round trips, cross-loading, the extractor's
BatchFeature / pad / truncation / serialization, padded batches vs the single-clip path, from_pretrained
arguments and model conveniences, each against the installed transformers classes."""

import json
import pickle

import numpy as np
import pytest
import torch

from dac_fast import PRESETS, DacConfig, DacFeatureExtractor, DacModel
from dac_fast.batch import encode_files
from dac_fast.dacfile import DacFile
from dac_fast.features import BatchFeature
from dac_fast.io import write_audio
from dac_fast.loading import randomize_
from tests.reference import model_pair, synth_audio

transformers = pytest.importorskip("transformers")

# A tiny layout with non-default latent width, codebook width and ratios (fast to build and run).
TINY = dict(encoder_hidden_size=4, downsampling_ratios=[2, 3, 5], decoder_hidden_size=32, n_codebooks=3,
            codebook_size=64, codebook_dim=4, hidden_size=24, sampling_rate=16000)
CONFIG_CASES = [dict(PRESETS[name]) for name in PRESETS] + [TINY, dict(codebook_dim=16),
                                                            dict(downsampling_ratios=[4, 5])]
COMPARED = ("encoder_hidden_size", "downsampling_ratios", "decoder_hidden_size", "n_codebooks", "codebook_size",
            "codebook_dim", "quantizer_dropout", "commitment_loss_weight", "codebook_loss_weight", "sampling_rate",
            "hidden_size", "hop_length", "upsampling_ratios", "frame_rate")


def same_fields(ours, ref):
    for field in COMPARED:
        assert np.array(getattr(ours, field)).tolist() == np.array(getattr(ref, field)).tolist(), field


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("fields", CONFIG_CASES, ids=lambda f: json.dumps(f, sort_keys=True))
def test_config_round_trips_both_ways(fields, tmp_path):
    # transformers' DacConfig takes hidden_size as a keyword; the 16 kbps preset is expressible
    ref = transformers.DacConfig(**fields)
    ours = DacConfig(**fields)
    same_fields(ours, ref)
    same_fields(DacConfig.from_dict(ref.to_dict()), ref)
    same_fields(transformers.DacConfig.from_dict(ours.to_dict()), ours)
    ours.save_pretrained(tmp_path / "ours")
    same_fields(transformers.DacConfig.from_pretrained(tmp_path / "ours"), ours)
    ref.save_pretrained(tmp_path / "ref")
    same_fields(DacConfig.from_pretrained(tmp_path / "ref"), ref)
    assert DacConfig.from_pretrained(tmp_path / "ref") == ours


def test_config_hidden_size_alias_and_errors():
    assert DacConfig(latent_dim=128).hidden_size == 128 == DacConfig.from_preset("44khz_16kbps").hidden_size
    assert "latent_dim" not in DacConfig.from_preset("44khz_16kbps").to_dict()
    with pytest.raises(ValueError, match="hidden_size=64 and its alias latent_dim=128 disagree"):
        DacConfig(hidden_size=64, latent_dim=128)
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        DacConfig(hidden_size=0)
    cfg = DacConfig()
    cfg.update({"encoder_hidden_size": 32, "n_codebooks": 4})  # hidden_size still derived, as transformers derives it
    ref = transformers.DacConfig(encoder_hidden_size=32, n_codebooks=4)
    same_fields(cfg, ref)
    with pytest.raises(TypeError, match="unexpected keys \\['n_layers'\\]"):
        cfg.update({"n_layers": 2})
    assert cfg.n_codebooks == 4 and cfg.use_return_dict
    assert DacConfig.from_dict(cfg.to_dict(), n_codebooks=2).n_codebooks == 2


# ----------------------------------------------------------------------------- cross-loading
def tiny_pair(seed=3):
    hf = transformers.DacModel(transformers.DacConfig(**TINY))
    randomize_(hf, seed)
    return hf.eval()


def tiny_audio(batch=2, length=3001):
    return torch.from_numpy(np.stack([synth_audio(length, 16000, seed=i) for i in range(batch)])[:, None])


def test_cross_loading_non_default_widths_gives_identical_codes_both_ways(tmp_path):
    hf = tiny_pair()
    hf.save_pretrained(tmp_path / "hf")
    ours = DacModel.from_pretrained(tmp_path / "hf")
    assert ours.config.hidden_size == 24 and ours.quantizer.quantizers[0].in_proj.in_channels == 24
    x = tiny_audio(length=3000)
    with torch.inference_mode():
        expected = hf.encode(x).audio_codes
        assert len(torch.unique(expected)) > 8, "codes should be diverse"
        assert torch.equal(ours.encode(x).audio_codes, expected)
    # and back: a dac_fast model saved and read by transformers
    mine = randomize_(DacModel(DacConfig(**TINY)), seed=8).eval()
    written = mine.save_pretrained(tmp_path / "ours")
    assert sorted(p.split("/")[-1] for p in written) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    back = transformers.DacModel.from_pretrained(tmp_path / "ours").eval()
    with torch.inference_mode():
        assert torch.equal(back.encode(x).audio_codes, mine.encode(x).audio_codes)


# ----------------------------------------------------------------------------- extractor
def both_extractors(**kwargs):
    return DacFeatureExtractor(**kwargs), transformers.DacFeatureExtractor(**kwargs)


def assert_same_features(ours, ref):
    assert list(ours.keys()) == list(ref.keys())
    for key in ref.keys():
        a, b = ours[key], ref[key]
        assert type(a) is type(b), key
        ragged = isinstance(b, list) or isinstance(b, np.ndarray) and b.dtype == object
        for x, y in zip(a, b) if ragged else [(a, b)]:
            assert type(x) is type(y) and x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), key
            assert np.array_equal(np.asarray(x), np.asarray(y)), key


CLIPS = [synth_audio(1001, 16000, 1), synth_audio(777, 16000, 2).astype(np.float64), synth_audio(333, 16000, 3)]
CALLS = [dict(), dict(padding="longest"), dict(padding=False), dict(padding="max_length", max_length=1500),
         dict(padding=False, truncation=True, max_length=700)]


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
@pytest.mark.parametrize("kwargs", CALLS, ids=lambda k: json.dumps(k))
def test_extractor_call_matches_transformers(kwargs, return_tensors):
    ours_fe, ref_fe = both_extractors(sampling_rate=16000, hop_length=320)
    for raw in (CLIPS, CLIPS[0], CLIPS[:1]):
        ragged = isinstance(raw, list) and len(raw) > 1 and kwargs.get("padding", True) in (False, "do_not_pad")
        if ragged and return_tensors:  # ragged batches cannot be tensors: both refuse
            with pytest.raises(ValueError):
                ref_fe(raw, sampling_rate=16000, return_tensors=return_tensors, **kwargs)
            with pytest.raises(ValueError, match="cannot convert 'input_values'"):
                ours_fe(raw, sampling_rate=16000, return_tensors=return_tensors, **kwargs)
            continue
        assert_same_features(ours_fe(raw, sampling_rate=16000, return_tensors=return_tensors, **kwargs),
                             ref_fe(raw, sampling_rate=16000, return_tensors=return_tensors, **kwargs))
    # "do_not_pad" is padding=False here (transformers' extractor fails on it: the string is truthy)
    assert_same_features(ours_fe(CLIPS, sampling_rate=16000, padding="do_not_pad"),
                         ref_fe(CLIPS, sampling_rate=16000, padding=False))


def as_kind(values, kind):
    return {"list": lambda v: v.tolist(), "np": lambda v: v, "pt": torch.from_numpy}[kind](values)


PADS = [dict(), dict(padding="max_length", max_length=1200), dict(padding=True, pad_to_multiple_of=128),
        dict(padding=False, truncation=True, max_length=500),
        dict(padding="max_length", max_length=600, truncation=True, pad_to_multiple_of=256),
        dict(return_attention_mask=False), dict(padding="longest", return_tensors="pt"), dict(return_tensors="np")]


@pytest.mark.parametrize("kind", ["list", "np", "pt"])
@pytest.mark.parametrize("kwargs", PADS, ids=lambda k: json.dumps(k))
@pytest.mark.parametrize("extractor", [dict(), dict(padding_value=0.25, padding_side="left")], ids=["right", "left"])
def test_extractor_pad_matches_transformers(kwargs, kind, extractor):
    ours_fe, ref_fe = both_extractors(sampling_rate=16000, hop_length=320, **extractor)
    clips = [as_kind(c, kind) for c in CLIPS]
    # a batch dict or a collator's list of dicts; made anew per call (transformers' pad changes its input)
    for batch in (lambda: {"input_values": list(clips)}, lambda: [{"input_values": c} for c in clips]):
        try:
            ref = ref_fe.pad(batch(), **kwargs)
        except ValueError:  # unpadded items of different lengths cannot be tensors: both refuse
            with pytest.raises(ValueError, match="cannot convert 'input_values'"):
                ours_fe.pad(batch(), **kwargs)
            continue
        ours = ours_fe.pad(batch(), **kwargs)
        assert isinstance(ours, BatchFeature)
        assert_same_features(ours, ref)


def test_extractor_pad_errors():
    fe = DacFeatureExtractor()
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        fe.pad({"input_values": [np.zeros(3)]}, padding="max_length")
    with pytest.raises(ValueError, match="truncation=True needs max_length"):
        fe.pad({"input_values": [np.zeros(3)]}, truncation=True)
    with pytest.raises(ValueError, match="holding 'input_values'"):
        fe.pad({"audio": [np.zeros(3)]})
    with pytest.raises(ValueError, match="padding must be True, False"):
        fe.pad({"input_values": [np.zeros(3)]}, padding="shortest")
    with pytest.raises(ValueError, match="return_tensors must be 'pt', 'np' or None"):
        fe(np.zeros(3), sampling_rate=16000, return_tensors="tf")


def test_batch_feature_behaves_like_transformers():
    ours_fe, ref_fe = both_extractors(sampling_rate=16000, hop_length=320)
    ours = ours_fe(CLIPS, sampling_rate=16000, return_tensors="pt")
    ref = ref_fe(CLIPS, sampling_rate=16000, return_tensors="pt")
    # (transformers' own extractor leaves a stale numpy .input_values attribute: compare by key)
    assert torch.equal(ours.input_values, ref["input_values"]) and list(ours.items())[0][0] == "padding_mask"
    for args in (("cpu",), (torch.float64,), ()):
        a, b = ours.to(*args), ref.to(*args)
        assert a is ours and a.input_values.dtype == b["input_values"].dtype
        assert a.padding_mask.dtype == b["padding_mask"].dtype
    with pytest.raises(AttributeError, match="no input 'attention_mask'"):
        ours.attention_mask
    with pytest.raises(ValueError, match="takes a device or a dtype"):
        ours.to([1])
    restored = pickle.loads(pickle.dumps(ours))
    assert torch.equal(restored.input_values, ours.input_values)
    as_numpy = ours_fe(CLIPS, sampling_rate=16000).convert_to_tensors("np")
    assert_same_features(as_numpy, ref_fe(CLIPS, sampling_rate=16000).convert_to_tensors("np"))


def test_extractor_serialization_both_ways(tmp_path):
    ours, ref = both_extractors(sampling_rate=24000, hop_length=320, padding_value=0.5)
    assert ours.to_dict() == {k: v for k, v in ref.to_dict().items() if k != "processor_class"}
    assert json.loads(ours.to_json_string()) == json.loads(ref.to_json_string())
    ours.to_json_file(tmp_path / "ours.json")
    assert transformers.DacFeatureExtractor.from_json_file(tmp_path / "ours.json").to_dict() == ref.to_dict()
    ref.to_json_file(tmp_path / "ref.json")
    assert DacFeatureExtractor.from_json_file(tmp_path / "ref.json") == ours
    assert DacFeatureExtractor.from_dict(ref.to_dict()) == ours
    assert DacFeatureExtractor.from_dict(ref.to_dict(), hop_length=512).hop_length == 512
    assert ours.save_pretrained(tmp_path / "a") == [str(tmp_path / "a" / "preprocessor_config.json")]
    assert transformers.DacFeatureExtractor.from_pretrained(tmp_path / "a").to_dict() == ref.to_dict()
    ref.save_pretrained(tmp_path / "b")
    assert DacFeatureExtractor.from_pretrained(tmp_path / "b") == ours


# ----------------------------------------------------------------------------- padded batch = single-clip path
@pytest.fixture(scope="module")
def pair16():
    return model_pair("16khz", seed=4)


def test_padded_batch_equals_transformers_single_clip_path(pair16, tmp_path):
    """The issue's case scaled down: a clip and two prefixes (odd lengths), batched with the extractor, give each
    clip's codes, frame count and decoded length of transformers' extractor + model on that clip alone; the file
    tools' masked batches (what the CLI's --bucket mask runs) give the same codes."""
    hf, ours = pair16
    sr = ours.config.sampling_rate
    clip = synth_audio(5299, sr, seed=7)
    clips = [clip, clip[:1241], clip[:321]]
    fe, hf_fe = DacFeatureExtractor.from_config(ours.config), transformers.DacFeatureExtractor(sampling_rate=sr,
                                                                                             hop_length=320)
    inputs = fe(raw_audio=clips, padding=True, sampling_rate=sr, return_tensors="pt")
    paths = []
    for i, c in enumerate(clips):
        paths.append(tmp_path / "in" / f"clip{i}.wav")
        write_audio(paths[-1], c, sr, subtype="FLOAT")
    with torch.inference_mode():
        out = ours.encode(inputs.input_values, padding_mask=inputs.padding_mask)
        audio = ours.decode(audio_codes=out.audio_codes, audio_frames=out.audio_frames).audio_values
        singles = [hf.encode(hf_fe(raw_audio=c, sampling_rate=sr, return_tensors="pt")["input_values"]) for c in clips]
        lengths = [hf.decode(audio_codes=s.audio_codes).audio_values.shape[-1] for s in singles]
    assert out.audio_frames.tolist() == [s.audio_codes.shape[-1] for s in singles] == [17, 4, 2]
    for b, single in enumerate(singles):
        frames = out.audio_frames[b]
        assert torch.equal(out.audio_codes[b, :, :frames], single.audio_codes[0]), f"item {b}"
        assert torch.all(audio[b, lengths[b]:] == 0) and audio[b, lengths[b] - 1] != 0
    report = encode_files([tmp_path / "in"], tmp_path / "codes", ours, normalize_db=None, bucket="mask", progress=False)
    assert report.ok, report.failures
    for path, single in zip(paths, singles):
        stored = DacFile.load(tmp_path / "codes" / (path.stem + ".dac")).codes
        assert np.array_equal(stored[0].astype(np.int64), single.audio_codes[0].numpy()), path.name


# ----------------------------------------------------------------------------- from_pretrained arguments
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    model = randomize_(DacModel(DacConfig(**TINY)), seed=2).eval()
    model.save_pretrained(directory / "sub")
    return model, directory


def test_from_pretrained_transformers_arguments(saved_tiny, tmp_path):
    model, directory = saved_tiny
    loaded = DacModel.from_pretrained(directory, subfolder="sub")
    assert torch.equal(loaded.encoder.conv1.weight, model.encoder.conv1.weight)
    # config= and state_dict= without a path
    state = model.state_dict()
    same = DacModel.from_pretrained(None, config=transformers.DacConfig(**TINY), state_dict=state)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), state.values()))
    # output_loading_info: missing tensors keep their initialization, unexpected ones are reported
    partial = {k: v for k, v in state.items() if k != "decoder.conv2.bias"} | {"extra.weight": torch.zeros(1)}
    loaded, info = DacModel.from_pretrained(None, config=model.config, state_dict=partial, output_loading_info=True)
    assert info == {"missing_keys": ["decoder.conv2.bias"], "unexpected_keys": ["extra.weight"],
                    "mismatched_keys": [], "error_msgs": []}
    assert torch.equal(loaded.decoder.conv2.bias, torch.zeros(1))
    with pytest.raises(ValueError, match="mis-shaped tensors: decoder.conv2.bias"):
        DacModel.from_pretrained(None, config=model.config, state_dict=partial | {"decoder.conv2.bias": torch.zeros(2)},
                                 output_loading_info=True)
    # save_pretrained(state_dict=) writes the given tensors, readable by transformers
    changed = {k: v + 1 if k == "decoder.conv2.bias" else v for k, v in state.items()}
    model.save_pretrained(tmp_path, state_dict=changed)
    reloaded = transformers.DacModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.decoder.conv2.bias, changed["decoder.conv2.bias"])
    with pytest.raises(ValueError, match="needs both config= and state_dict="):
        DacModel.from_pretrained(None, config=model.config)
    with pytest.raises(FileNotFoundError, match="subfolder 'nope' does not exist"):
        DacModel.from_pretrained(directory, subfolder="nope")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['ignore_mismatched_sizes'\\]"):
        DacModel.from_pretrained(directory, subfolder="sub", ignore_mismatched_sizes=True)
    with pytest.raises(TypeError, match="config must be a DacConfig"):
        DacModel.from_pretrained(None, config=3, state_dict=state)


def test_hub_arguments_reach_huggingface_hub(monkeypatch, saved_tiny, tmp_path):
    import huggingface_hub

    model, directory = saved_tiny
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub = dict(revision="v1", cache_dir=str(tmp_path), force_download=True, local_files_only=True)
    DacModel.from_pretrained("someone/dac", subfolder="sub", **hub)
    DacConfig.from_pretrained("someone/dac", subfolder="sub", **hub)
    DacFeatureExtractor.from_pretrained("someone/dac", subfolder="sub", **hub)
    assert len(calls) == 3
    for repo_id, kwargs in calls:
        assert repo_id == "someone/dac" and kwargs["revision"] == "v1" and kwargs["force_download"] is True
        assert kwargs["cache_dir"] == str(tmp_path) and kwargs["local_files_only"] is True
        assert "sub/config.json" in kwargs["allow_patterns"]


def test_hub_needs_huggingface_hub(monkeypatch, saved_tiny):
    model, directory = saved_tiny
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="push_to_hub needs huggingface_hub"):
        model.push_to_hub("someone/dac")
    with pytest.raises(ImportError, match="push_to_hub needs huggingface_hub"):
        DacFeatureExtractor().push_to_hub("someone/dac")
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        DacModel.from_pretrained("someone/dac", revision="v1")


def test_push_to_hub_uploads_the_saved_files(monkeypatch, saved_tiny):
    import huggingface_hub

    model, _ = saved_tiny
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            import os

            uploads.append(("upload", repo_id, sorted(os.listdir(folder_path)), kwargs["commit_message"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model.push_to_hub("me/dac", commit_message="hi", private=True)
    assert uploads == [("create", "me/dac", True),
                       ("upload", "me/dac", ["config.json", "model.safetensors", "preprocessor_config.json"], "hi")]
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        model.push_to_hub("me/dac", max_shard_size="1GB")


# ----------------------------------------------------------------------------- model conveniences
def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    import dac_fast.pretrained as pretrained

    model = DacModel.from_transformers(tiny_pair(seed=5)).train()
    x = tiny_audio(batch=2, length=600)

    def grads():
        model.zero_grad()
        out = model(x)
        (out.audio_values.square().mean() + out.loss.mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    recomputed = []
    real_checkpoint = pretrained.checkpoint
    monkeypatch.setattr(pretrained, "checkpoint",
                        lambda fn, *a, **k: recomputed.append(fn) or real_checkpoint(fn, *a, **k))
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checked = grads()
    assert len(recomputed) == len(model.encoder.block) + len(model.decoder.block)
    assert plain.keys() == checked.keys() and len(plain) > 50
    for name in plain:
        assert torch.allclose(plain[name], checked[name], rtol=1e-5, atol=1e-7), name
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_model_conveniences_match_transformers():
    hf = tiny_pair()
    ours = DacModel.from_transformers(hf)
    for only_trainable, exclude_embeddings in ((False, False), (True, True)):
        assert ours.num_parameters(only_trainable, exclude_embeddings) == hf.num_parameters(
            only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    assert ours.get_memory_footprint() == hf.get_memory_footprint()
    assert ours.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)
    assert ours.can_generate() is hf.can_generate() is False
    for attribute in ("main_input_name", "base_model_prefix"):
        assert getattr(ours, attribute) == getattr(hf, attribute), attribute
    # transformers' DacModel refuses gradient checkpointing; dac_fast implements it (README: Differences)
    assert ours.supports_gradient_checkpointing and not hf.supports_gradient_checkpointing
    assert ours.config_class is DacConfig and hf.config_class is transformers.DacConfig
