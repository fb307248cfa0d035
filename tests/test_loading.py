"""Checkpoint formats: original .pth (three weight-norm styles), transformers directories both ways, errors."""

import copy
import os

import pytest
import torch

from dac_fast import DacConfig, DacModel, ops
from dac_fast.loading import fold_weight_norm, randomize_
from tests.reference import hf_config, import_original_dac, model_pair, randomize_original_, synth_audio

transformers = pytest.importorskip("transformers")

ORIGINAL_KWARGS = {
    "44khz": dict(encoder_dim=64, encoder_rates=[2, 4, 8, 8], decoder_dim=1536, decoder_rates=[8, 8, 4, 2],
                  n_codebooks=9, codebook_size=1024, codebook_dim=8, quantizer_dropout=False, sample_rate=44100),
    "44khz_16kbps": dict(encoder_dim=64, encoder_rates=[2, 4, 8, 8], latent_dim=128, decoder_dim=1536,
                         decoder_rates=[8, 8, 4, 2], n_codebooks=18, codebook_size=1024, codebook_dim=8,
                         quantizer_dropout=False, sample_rate=44100),
    "16khz": dict(encoder_dim=64, encoder_rates=[2, 4, 5, 8], decoder_dim=1536, decoder_rates=[8, 5, 4, 2],
                  n_codebooks=12, codebook_size=1024, codebook_dim=8, quantizer_dropout=False, sample_rate=16000),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def original_checkpoints(tmp_path_factory):
    """Original DAC models with seeded weights, saved as the original package saves them."""
    dac = import_original_dac()
    out = {}
    for name, kwargs in ORIGINAL_KWARGS.items():
        model = dac.DAC(**kwargs).eval()
        randomize_original_(model, seed=len(name))
        path = tmp_path_factory.mktemp("orig") / f"{name}.pth"
        torch.save({"state_dict": model.state_dict(), "metadata": {"kwargs": kwargs}}, path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", list(ORIGINAL_KWARGS))
def test_original_checkpoint_matches_original_package(original_checkpoints, name):
    original, path = original_checkpoints[name]
    assert any(k.endswith("weight_g") for k in original.state_dict())
    ours = DacModel.from_original(path)
    assert ours.config == DacConfig.from_preset(name)
    sr, hop = ours.config.sampling_rate, ours.config.hop_length
    x = torch.from_numpy(synth_audio(hop * 17, sr, seed=5))[None, None]
    with torch.inference_mode():
        z_ref, codes_ref, latents_ref, _, _ = original.encode(x)
        out = ours.encode(x)
        # The original computes the codebook distances with another formula than transformers (other rounding):
        # near-ties may pick other codes, so agreement is measured; with these weights it is total.
        agreement = (out.audio_codes == codes_ref).float().mean().item()
        assert agreement >= 0.99, agreement
        assert rel_err(ours.encoder(x), original.encoder(x)) < 1e-5
        with ops.backend("torch"):  # the reference arithmetic: only the converted weights can differ
            assert rel_err(ours.decoder(z_ref), original.decoder(z_ref)) < 1e-5
        # the fast path reassociates the upsampling convolutions; this random decoder amplifies rounding ~10x
        assert rel_err(ours.decoder(z_ref), original.decoder(z_ref)) < 1e-4
        if agreement == 1.0:
            assert rel_err(out.quantized_representation, z_ref) < 1e-5
            assert rel_err(out.projected_latents, latents_ref) < 1e-5


def test_original_checkpoint_matches_equivalent_transformers_model(original_checkpoints, tmp_path):
    """The converted original weights, given to transformers' DacModel, give our outputs exactly."""
    _, path = original_checkpoints["16khz"]
    ours = DacModel.from_original(path)
    ours.save_pretrained(tmp_path / "hf")
    hf = transformers.DacModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.from_numpy(synth_audio(320 * 13, 16000, seed=6))[None, None]
    with torch.inference_mode():
        ref, out = hf.encode(x), ours.encode(x)
        assert torch.equal(out.audio_codes, ref.audio_codes)
        assert rel_err(out.quantized_representation, ref.quantized_representation) < 1e-5


def test_parametrizations_weight_norm_style(original_checkpoints, tmp_path):
    """Newer torch saves weight norm as parametrizations.weight.original0/1: same model after folding."""
    dac = import_original_dac()
    original, path = original_checkpoints["16khz"]
    model = dac.DAC(**ORIGINAL_KWARGS["16khz"]).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            torch.nn.utils.remove_weight_norm(module)
            torch.nn.utils.parametrizations.weight_norm(module)
    sd = original.state_dict()
    new_sd = {}
    for k, v in sd.items():
        k = k.replace(".weight_g", ".parametrizations.weight.original0").replace(
            ".weight_v", ".parametrizations.weight.original1")
        new_sd[k] = v
    model.load_state_dict(new_sd)
    assert any("parametrizations.weight.original1" in k for k in model.state_dict())
    p = tmp_path / "param.pth"
    torch.save({"state_dict": model.state_dict(), "metadata": {"kwargs": ORIGINAL_KWARGS["16khz"]}}, p)
    a, b = DacModel.from_original(path), DacModel.from_original(p)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_fold_weight_norm_matches_torch():
    conv = torch.nn.ConvTranspose1d(6, 4, 10, stride=5)
    torch.nn.utils.weight_norm(conv)  # dim 0 is the input-channel axis of a transposed conv
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand_like(conv.weight_g) + 0.5)
    folded = fold_weight_norm({"c.weight_g": conv.weight_g, "c.weight_v": conv.weight_v, "c.bias": conv.bias})
    conv(torch.zeros(1, 6, 3))  # recompute .weight from g and v
    assert torch.equal(folded["c.weight"], conv.weight)
    assert set(folded) == {"c.weight", "c.bias"}
    with pytest.raises(ValueError, match="half a weight-norm pair.*'c'"):
        fold_weight_norm({"c.weight_g": conv.weight_g})


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    hf, ours = model_pair("24khz", seed=8)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    hf_loaded = transformers.DacModel.from_pretrained(tmp_path / "ours").eval()
    fe = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "ours")
    assert fe.hop_length == 320 and fe.sampling_rate == 24000
    hf.save_pretrained(tmp_path / "hf")
    ours_loaded = DacModel.from_pretrained(tmp_path / "hf")
    for model in (hf_loaded, ours_loaded):
        for (k, v), (k2, v2) in zip(hf.state_dict().items(), model.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    ref_sd = hf.state_dict()
    assert ours.state_dict().keys() == ref_sd.keys()
    strict = transformers.DacModel(hf.config)
    strict.load_state_dict(ours.state_dict(), strict=True)


def test_stale_hop_length_in_config_is_ignored(tmp_path):
    _, ours = model_pair("16khz", seed=1)
    ours.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hop_length"] = 512
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = DacModel.from_pretrained(tmp_path)
    assert loaded.config.hop_length == 320


def test_load_on_target_dtype(tmp_path):
    _, ours = model_pair("16khz", seed=1)
    ours.save_pretrained(tmp_path)
    loaded = DacModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not loaded.training


# ----------------------------------------------------------------------------- errors
def test_missing_unexpected_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, ours = model_pair("16khz", seed=1)
    ours.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["decoder.conv2.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["quantizer.quantizers.0.codebook.weight"] = torch.zeros(512, 8)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as info:
        DacModel.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "missing tensors: decoder.conv2.bias" in msg
    assert "unexpected tensors: encoder.extra.weight" in msg
    assert "quantizer.quantizers.0.codebook.weight (expected (1024, 8), got (512, 8))" in msg


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weights": {}}, bad)
    with pytest.raises(ValueError, match="not an original DAC checkpoint"):
        DacModel.from_original(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DacModel.from_original(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DacModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        DacModel.from_pretrained(tmp_path / "nope" / "deeper" / "x")


def test_unreachable_hub_id_gives_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="could not find 'descript/dac_16khz' in the Hugging Face cache"):
        DacModel.from_pretrained("descript/dac_16khz")


# ----------------------------------------------------------------------------- inference mode, dtype, device
# A small model of the real structure (strides 2, 4, 5: even and odd polyphase upsampling) keeps these fast.
SMALL = DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 5], decoder_hidden_size=64, n_codebooks=4)


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    """A small model with seeded weights, its directory, and codes to decode (6 frames)."""
    model = randomize_(DacModel(SMALL), seed=11).eval()
    directory = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(directory)
    codes = torch.randint(0, 1024, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    return model, directory, codes


def _made_under(path, model, directory):
    """The model ``model`` made again by ``path``; the caller chooses the grad mode."""
    if path == "init":
        fresh = DacModel(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        return fresh
    if path == "randomize":  # what from_preset does, with the small config
        return randomize_(DacModel(model.config), seed=11).eval()
    if path == "from_pretrained":
        return DacModel.from_pretrained(directory)
    if path == "half":
        return DacModel.from_pretrained(directory).half()
    if path == "to":
        return DacModel(model.config).eval().to(torch.float64).to(torch.float32).requires_grad_(False)
    raise AssertionError(path)


@pytest.mark.parametrize("path, mode", [(path, "inference_mode") for path in ("init", "randomize", "from_pretrained",
                                                                          "half", "to")]
                         + [("init", "no_grad"), ("half", "no_grad")])
def test_models_made_without_grad_decode_and_forward(saved_small, path, mode):
    """Loading under inference_mode (a serving pattern) once broke decode: inference tensors track no version
    counter, which the polyphase weight cache read. Every way of making a model must decode and run forward."""
    model, directory, codes = saved_small
    reference = copy.deepcopy(model).half() if path == "half" else model
    audio = torch.from_numpy(synth_audio(40 * 9 + 7, 16000, seed=4))[None, None]
    with torch.inference_mode():
        expected = reference.decode(audio_codes=codes).audio_values
        expected_forward = reference(audio.to(reference.dtype)).audio_values
    scope = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with scope:
        made = _made_under(path, model, directory)
        if path == "to":
            made.load_state_dict(model.state_dict())
        for _ in range(2):  # the second call uses the phase weights cached by the first, where there is a cache
            assert torch.equal(made.decode(audio_codes=codes).audio_values, expected)
        assert torch.equal(made(audio.to(made.dtype)).audio_values, expected_forward)


def test_polyphase_cache_sees_in_place_updates(saved_small):
    """Weights made under inference_mode track no version: updating them in place there (load_state_dict) must
    still change the output, and so must an in-place update of an ordinary bias."""
    model, _, codes = saved_small
    with torch.inference_mode():
        expected = model.decode(audio_codes=codes).audio_values
        fresh = DacModel(model.config).eval()
        before = fresh.decode(audio_codes=codes).audio_values
        fresh.load_state_dict(model.state_dict())
        assert not torch.equal(before, expected)
        assert torch.equal(fresh.decode(audio_codes=codes).audio_values, expected)
    from dac_fast.convolution import conv_transpose_polyphase

    conv = torch.nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2)
    x = torch.randn(2, 6, 9)
    with torch.no_grad():
        conv_transpose_polyphase(conv, x)
        conv.bias.add_(1.0)
        assert torch.allclose(conv_transpose_polyphase(conv, x), conv(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(torch_dtype=torch.float16), torch.float16),
    (dict(dtype="bfloat16"), torch.bfloat16),
    (dict(dtype="torch.float16", torch_dtype=torch.float16), torch.float16),
    (dict(dtype="auto", torch_dtype=torch.float32), torch.float32),
    (dict(dtype=None), torch.float32),
])
def test_from_pretrained_dtype_spellings(saved_small, kwargs, expected):
    _, directory, _ = saved_small
    model = DacModel.from_pretrained(directory, **kwargs)
    assert model.dtype == expected and not model.training


def test_from_pretrained_dtype_auto(saved_small, tmp_path):
    """"auto": the dtype config.json records (transformers writes it), else the weights' dtype."""
    import json

    model, directory, _ = saved_small
    assert DacModel.from_pretrained(directory, dtype="auto").dtype == torch.float32
    copy.deepcopy(model).half().save_pretrained(tmp_path)
    assert DacModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.float16
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert DacModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert DacModel.from_pretrained(tmp_path).dtype == torch.float32  # transformers' default: fp32


def test_from_pretrained_device_map(saved_small):
    _, directory, _ = saved_small
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    for device_map, expected in (("cpu", "cpu"), ({"": "cpu"}, "cpu"), (torch.device("cpu"), "cpu"), ("auto", auto)):
        assert DacModel.from_pretrained(directory, device_map=device_map).device.type == expected
    with pytest.raises(ValueError, match="splits the model"):
        DacModel.from_pretrained(directory, device_map={"encoder": "cpu", "decoder": "meta"})
    with pytest.raises(ValueError, match="device_map must be a device"):
        DacModel.from_pretrained(directory, device_map="balanced")
    with pytest.raises(ValueError, match="disagree"):
        DacModel.from_pretrained(directory, device="cpu", device_map="meta")


def test_from_pretrained_rejects_what_it_does_not_understand(saved_small, original_checkpoints):
    _, directory, _ = saved_small
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['low_cpu_mem', 'n_codebooks'\]"):
        DacModel.from_pretrained(directory, low_cpu_mem=True, n_codebooks=4)
    for bad in ("float17", "int8", torch.int8, "auto-ish"):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            DacModel.from_pretrained(directory, dtype=bad)
    with pytest.raises(ValueError, match="disagree"):
        DacModel.from_pretrained(directory, dtype="float16", torch_dtype=torch.bfloat16)
    # genuine hub arguments are accepted (and unused for a local directory)
    DacModel.from_pretrained(directory, revision="main", local_files_only=True, cache_dir=None, token=None)
    _, path = original_checkpoints["16khz"]
    assert DacModel.from_original(path, dtype="bfloat16").dtype == torch.bfloat16


def test_num_parameters_matches_transformers():
    hf = transformers.DacModel(hf_config(SMALL))
    ours = DacModel.from_transformers(hf)
    for flags in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**flags) == hf.num_parameters(**flags), flags
    ours.quantizer.requires_grad_(False)
    hf.quantizer.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True) < ours.num_parameters()
