"""The quantizer's weight-derived caches (stacked parameters, normalized codebooks): used, and rebuilt whenever
the weights change, so codes always equal those of a freshly built model with the same weights (CPU, fp32 and
the dtypes a model converts to). A model still deep-copies and pickles after use."""

import copy
import pickle

import pytest
import torch

from dac_fast import DacModel
from tests.reference import synth_audio


@pytest.fixture(scope="module")
def audio():
    return torch.from_numpy(synth_audio(3 * 320 + 77, 16000, seed=3)).float().view(1, 1, -1).repeat(2, 1, 1)


def _codes(model, audio):
    with torch.inference_mode():
        return model.encode(audio.to(model.dtype)).audio_codes


def _fresh_codes(model, audio):
    """Codes of a model built anew from ``model``'s weights (no cache carried over)."""
    fresh = DacModel(model.config).to(model.dtype).eval()
    fresh.load_state_dict(model.state_dict())
    return _codes(fresh, audio)


def test_stacked_parameters_are_cached_and_rebuilt_on_change():
    model = DacModel.from_preset("16khz", seed=0)
    with torch.no_grad():
        first = model.quantizer.stacked_parameters()
        assert model.quantizer.stacked_parameters() is first  # cached: same tensors, nothing re-stacked
        model.quantizer.quantizers[3].codebook.weight.mul_(2)
        second = model.quantizer.stacked_parameters()
        assert second is not first
        assert torch.equal(second[2][3], model.quantizer.quantizers[3].codebook.weight)
    # autograd needs the parameters in the graph: nothing cached, gradients reach the codebooks
    stacked = model.quantizer.stacked_parameters()
    assert stacked[2].requires_grad and stacked is not second
    stacked[2].sum().backward()
    assert model.quantizer.quantizers[0].codebook.weight.grad is not None


def test_fused_quantizer_gets_cached_normalized_codebooks(audio, monkeypatch):
    """encode hands the rvq op the normalized codebooks built once per weight version (not per call)."""
    from dac_fast import ops

    model = DacModel.from_preset("16khz", seed=0)
    seen = []
    real = ops.rvq_encode

    def spy(*args, normalized_codebook=None, **kwargs):
        seen.append(normalized_codebook)
        return real(*args, normalized_codebook=normalized_codebook, **kwargs)

    monkeypatch.setattr(ops, "rvq_encode", spy)
    first = _codes(model, audio)
    _codes(model, audio)
    assert len(seen) == 2 and seen[0] is not None and seen[1] is seen[0]
    with torch.no_grad():
        model.quantizer.quantizers[0].codebook.weight.mul_(-1)
    after = _codes(model, audio)
    assert seen[2] is not seen[0] and torch.equal(after, _fresh_codes(model, audio))
    assert not torch.equal(after, first)
    codebooks = torch.stack([q.codebook.weight for q in model.quantizer.quantizers])
    assert torch.equal(seen[2], torch.nn.functional.normalize(codebooks, dim=-1))


def test_normalized_codebook_cached_and_rebuilt_on_change():
    model = DacModel.from_preset("16khz", seed=0)
    q = model.quantizer.quantizers[0]
    latents = torch.randn(2, q.codebook_dim, 9)
    with torch.no_grad():
        _, before = q.decode_latents(latents)
        assert "_normalized_codebook" in q.__dict__["_derived"]
        q.codebook.weight.neg_()
        _, after = q.decode_latents(latents)
    fresh = copy.deepcopy(q)
    fresh.__dict__.pop("_derived")
    with torch.no_grad():
        assert torch.equal(after, fresh.decode_latents(latents)[1])
    assert not torch.equal(after, before)


@pytest.mark.parametrize("change", ["mul_", "load_state_dict", "bfloat16", "half", "half_then_float"])
def test_codes_follow_weight_changes(audio, change):
    model = DacModel.from_preset("16khz", seed=0)
    before = _codes(model, audio)  # fills the caches
    if change == "mul_":
        with torch.no_grad():
            for q in model.quantizer.quantizers:
                q.codebook.weight.mul_(-1)
                q.in_proj.weight.mul_(1.5)
    elif change == "load_state_dict":
        model.load_state_dict(DacModel.from_preset("16khz", seed=1).state_dict())
    elif change == "bfloat16":
        model.to(torch.bfloat16)
    elif change == "half":
        model.half()
    else:  # fp16 storage freed, then fp32 storage again: addresses may repeat with the same versions
        model.half()
        _codes(model, audio)
        model.float()
    after = _codes(model, audio)
    assert torch.equal(after, _fresh_codes(model, audio))
    if change in ("mul_", "load_state_dict"):
        assert not torch.equal(after, before), "the change should move the codes"


@pytest.mark.parametrize("change", ["mul_", "load_state_dict", "half_then_float"])
def test_decoder_caches_follow_weight_changes(change):
    """The decoder's weight-derived caches (polyphase weights offline, packed oneDNN weights in a stream):
    after a change, offline and streamed audio equal a fresh model's."""
    model = DacModel.from_preset("16khz", seed=0)
    codes = torch.randint(0, 1024, (1, 12, 9), generator=torch.Generator().manual_seed(4))

    def decoded(m):
        with torch.inference_mode():
            offline = m.decode(audio_codes=codes).audio_values
        stream = m.streaming_decoder()
        return offline, torch.cat([stream.push(codes[..., :4]), stream.push(codes[..., 4:]), stream.flush()], -1)

    before = decoded(model)  # fills the caches
    if change == "mul_":
        with torch.no_grad():
            for module in model.decoder.modules():
                if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                    module.weight.mul_(0.5)
    elif change == "load_state_dict":
        model.load_state_dict(DacModel.from_preset("16khz", seed=1).state_dict())
    else:  # fp16 storage freed, then fp32 storage again: addresses may repeat with the same versions
        model.half()
        model.float()
    fresh = DacModel(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    after, expected = decoded(model), decoded(fresh)
    assert torch.equal(after[0], expected[0])
    assert (after[1] - expected[1]).abs().max().item() == 0  # the same packing of the same weights
    assert not torch.equal(after[0], before[0]), "the change should move the audio"


def test_updates_through_data_need_clear_weight_caches(audio):
    """``.data`` updates bump no version counter: the caches cannot see them; clear_weight_caches() makes the
    model equal a fresh one again (codes and decoded audio)."""
    model = DacModel.from_preset("16khz", seed=0)
    codes = _codes(model, audio)
    with torch.inference_mode():
        model.decode(audio_codes=codes)
    for q in model.quantizer.quantizers:
        q.codebook.weight.data.neg_()
    model.decoder.block[0].conv_t1.weight.data.mul_(0.5)
    model.clear_weight_caches()
    fresh = DacModel(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_codes(model, audio), _codes(fresh, audio))
    with torch.inference_mode():
        assert torch.equal(model.decode(audio_codes=codes).audio_values, fresh.decode(audio_codes=codes).audio_values)


def test_moving_a_model_drops_its_weight_caches(audio):
    """.to()/.half() clear the caches first: nothing built from the old weights (nor the old weights) is kept."""
    from dac_fast.convolution import PACKED_WEIGHTS

    model = DacModel.from_preset("16khz", seed=0)
    codes = _codes(model, audio)
    model.streaming_decoder(batch_size=codes.shape[0]).push(torch.cat([codes, codes], dim=-1))
    assert any("_derived" in m.__dict__ for m in model.modules())
    assert any(m in PACKED_WEIGHTS for m in model.modules())
    model.to(torch.float64)
    assert not any("_derived" in m.__dict__ for m in model.modules())
    assert not any(m in PACKED_WEIGHTS for m in model.modules())


def test_model_deep_copies_and_pickles_after_use(audio):
    model = DacModel.from_preset("16khz", seed=0)
    codes = _codes(model, audio)
    with torch.no_grad():
        model.quantizer.stacked_parameters()
        model.quantizer.quantizers[0].decode_latents(torch.randn(1, 8, 3))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_codes(clone, audio), codes)
        with torch.no_grad():  # the clone's own weights change; the original's codes do not
            for q in clone.quantizer.quantizers:
                q.codebook.weight.mul_(-1)
        assert torch.equal(_codes(clone, audio), _fresh_codes(clone, audio))
        assert torch.equal(_codes(model, audio), codes)


def test_inference_tensor_weights_are_not_cached(audio):
    with torch.inference_mode():
        model = DacModel(DacModel.from_preset("16khz", seed=0).config).eval()
        assert model.quantizer.quantizers[0].codebook.weight.is_inference()
        first = model.quantizer.stacked_parameters()
        assert model.quantizer.stacked_parameters() is not first
        assert "_stacked" not in model.quantizer.__dict__
