"""DacModel against transformers' DacModel with the same seeded random weights (fp32, CPU)."""

import math

import numpy as np
import pytest
import torch

from dac_fast import DacFeatureExtractor, DacModel, ops
from dac_fast.tiles import decoded_length
from tests.reference import model_pair, synth_audio

transformers = pytest.importorskip("transformers")

RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL, what=""):
    """Within rtol relative to the expected tensor's scale (elementwise relative error is meaningless near 0)."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g} exceeds {rtol} x scale {scale:.3g}"


def batch_of_two(config):
    """Two clips of different lengths through the feature extractor (right padding, padding_mask)."""
    sr = config.sampling_rate
    clips = [synth_audio(int(0.31 * sr) + 7, sr, seed=1), synth_audio(int(0.17 * sr) + 3, sr, seed=2)]
    fe = DacFeatureExtractor.from_config(config)
    inputs = fe(clips, sampling_rate=sr, return_tensors="pt")
    hf_fe = transformers.DacFeatureExtractor(sampling_rate=sr, hop_length=config.hop_length)
    hf_inputs = hf_fe(clips, sampling_rate=sr, return_tensors="pt")
    assert torch.equal(inputs["input_values"], hf_inputs["input_values"])
    assert torch.equal(inputs["padding_mask"], hf_inputs["padding_mask"])
    return inputs["input_values"]


@pytest.fixture(scope="module", params=["16khz", "24khz", "44khz"])
def pair(request):
    return model_pair(request.param, seed=11)


def test_encode_decode_forward_match_transformers(pair):
    hf, ours = pair
    x = batch_of_two(ours.config)
    with torch.inference_mode():
        ref = hf.encode(x)
        out = ours.encode(x)
        assert torch.equal(out.audio_codes, ref.audio_codes)
        assert len(torch.unique(out.audio_codes)) > 50, "codes should be diverse on this audio"
        assert_close(out.quantized_representation, ref.quantized_representation, what="quantized_representation")
        assert_close(out.projected_latents, ref.projected_latents, what="projected_latents")
        assert_close(out.loss, ref.loss, what="loss")
        assert out.loss.shape == ref.loss.shape

        ref_audio = hf.decode(ref.quantized_representation).audio_values
        audio = ours.decode(out.quantized_representation).audio_values
        assert audio.shape == ref_audio.shape == (2, decoded_length(ours.config, x.shape[-1] // ours.config.hop_length))
        assert_close(audio, ref_audio, what="decode")
        # decoding from codes goes through the fused decode-from-codes path
        audio_from_codes = ours.decode(audio_codes=out.audio_codes).audio_values
        assert_close(audio_from_codes, hf.decode(audio_codes=ref.audio_codes).audio_values, what="decode(codes)")

        ref_fwd = hf(x, return_dict=False)
        fwd = ours(x, return_dict=False)
        assert len(fwd) == len(ref_fwd) == 5
        assert torch.equal(fwd[3], ref_fwd[3])
        for i in (0, 1, 2, 4):
            assert_close(fwd[i], ref_fwd[i], what=f"forward[{i}]")


def test_n_quantizers_and_tuple_order(pair):
    hf, ours = pair
    x = batch_of_two(ours.config)
    with torch.inference_mode():
        ref = hf.encode(x, n_quantizers=3, return_dict=False)
        out = ours.encode(x, n_quantizers=3, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 4
    assert out[2].shape[1] == 3 and out[3].shape[1] == 3 * ours.config.codebook_dim
    assert torch.equal(out[2], ref[2])
    for i in (0, 1, 3):
        assert_close(out[i], ref[i], what=f"encode[{i}]")


def test_pure_torch_backend_is_bit_identical():
    hf, ours = model_pair("16khz", seed=5)
    ours.backend = "torch"
    x = torch.from_numpy(synth_audio(320 * 23, 16000, seed=9))[None, None]
    with torch.inference_mode():
        ref, out = hf.encode(x), ours.encode(x)
        for a, b in zip(ref.to_tuple(), out.to_tuple()):
            assert torch.equal(a, b)
        assert torch.equal(hf.decode(ref.quantized_representation).audio_values,
                           ours.decode(out.quantized_representation).audio_values)


def test_output_classes_behave_like_transformers(pair):
    hf, ours = pair
    x = batch_of_two(ours.config)
    with torch.inference_mode():
        ref, out = hf.encode(x), ours.encode(x)
    assert list(out.keys()) == list(ref.keys())
    assert torch.equal(out["audio_codes"], out.audio_codes) and torch.equal(out[2], out.audio_codes)
    assert len(out.to_tuple()) == len(ref.to_tuple())


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_train_mode_losses_and_gradients(dropout):
    hf, ours = model_pair("16khz", seed=3, quantizer_dropout=dropout)
    ours = DacModel.from_transformers(hf)
    hf.train()
    ours.train()
    x = torch.from_numpy(np.stack([synth_audio(320 * 9, 16000, seed=s) for s in (1, 2)]))[:, None]
    outs = []
    for model in (hf, ours):
        model.zero_grad()
        torch.manual_seed(1234)  # same quantizer-dropout draw on both sides
        out = model(x)
        (out.loss.mean() + out.audio_values.pow(2).mean()).backward()
        outs.append(out)
    assert_close(outs[1].loss, outs[0].loss, what="train loss")
    assert torch.equal(outs[1].audio_codes, outs[0].audio_codes)
    hf_grads = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        if ref is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, ref, rtol=1e-4, what=f"grad {name}")
        checked += 1
    assert checked > 100


def _perturb_weight_norm_gains_(model, seed):
    """apply_weight_norm sets g = ||v|| (scale 1), which would hide a scale on the wrong axis: draw new gains."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("parametrizations.weight.original0"):
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)


def test_weight_norm_training_never_builds_conv_weights(monkeypatch):
    """Training under weight norm: conv1 + Snake fused through scale_bias_snake, every other conv on v with
    the g / ||v|| scale on its output (on its input for ConvTranspose1d, whose norm runs over input channels).
    Forward, losses and gradients for g, v, biases and alphas match transformers' parametrized model."""
    hf, ours = model_pair("16khz", seed=5)
    for model in (hf, ours):
        model.apply_weight_norm()
        _perturb_weight_norm_gains_(model, seed=9)
        model.train()
    x = torch.from_numpy(np.stack([synth_audio(320 * 9 + 17, 16000, seed=s) for s in (3, 4)]))[:, None]
    calls = []
    original = torch.nn.utils.parametrizations._WeightNorm.forward

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    outs = []
    for model in (hf, ours):
        calls.clear()
        model.zero_grad()
        torch.manual_seed(77)
        with monkeypatch.context() as m:
            m.setattr(torch.nn.utils.parametrizations._WeightNorm, "forward", counting)
            out = model(x)
        (out.loss.mean() + out.audio_values.pow(2).mean()).backward()
        outs.append((out, len(calls)))
    (ref, hf_calls), (out, our_calls) = outs
    n_convs = sum(isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) for m in ours.modules())
    n_quantizer_convs = 2 * ours.config.n_codebooks
    assert hf_calls >= n_convs  # the reference builds every weight
    assert our_calls <= n_quantizer_convs  # only the quantizer's 1x1 projections still build theirs
    assert_close(out.audio_values, ref.audio_values, rtol=1e-4, what="weight-norm train audio")
    assert_close(out.loss, ref.loss, what="weight-norm train loss")
    assert torch.equal(out.audio_codes, ref.audio_codes)
    hf_params = dict(hf.named_parameters())
    checked = {"original0": 0, "original1": 0, "bias": 0, "alpha": 0}
    for name, p in ours.named_parameters():
        ref_grad = hf_params[name].grad
        if ref_grad is None:
            continue
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, ref_grad, rtol=2e-4, what=f"grad {name}")
        for key in checked:
            checked[key] += name.endswith(key)
    assert all(v > 10 for v in checked.values()), checked


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_forward_weight_norm_axis(transposed):
    """The scale goes on the axis weight norm normalizes: output channels for Conv1d, input channels for
    ConvTranspose1d (its weight is (C_in, C_out, k))."""
    from dac_fast.convolution import conv_forward

    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose1d(6, 4, kernel_size=8, stride=4, padding=2) if transposed
            else torch.nn.Conv1d(6, 4, kernel_size=7, dilation=3, padding=9))
    torch.nn.utils.parametrizations.weight_norm(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(torch.rand_like(conv.parametrizations.weight.original0) + 0.5)
    x = torch.randn(2, 6, 33, dtype=torch.float64, requires_grad=True)
    conv = conv.double()
    ref = conv(x)
    out = conv_forward(conv, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *conv.parameters()])
    g_out = torch.autograd.grad(out.square().sum(), [x, *conv.parameters()])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_time_tiles_give_identical_codes():
    _, ours = model_pair("16khz", seed=7)
    hop = ours.config.hop_length
    x = torch.from_numpy(synth_audio(hop * 151, 16000, seed=4))[None, None]
    with torch.inference_mode():
        whole = ours.encode(x, tile_frames=10**6)
        tiled = ours.encode(x, tile_frames=37)
        assert torch.equal(tiled.audio_codes, whole.audio_codes)
        for odd in (hop * 100 + 1, hop * 100 + 177, hop * 100 - 1):  # a partial last hop
            whole_odd = ours.encode(x[..., :odd], tile_frames=10**6)
            tiled_odd = ours.encode(x[..., :odd], tile_frames=31)
            assert torch.equal(tiled_odd.audio_codes, whole_odd.audio_codes), odd
        assert_close(tiled.quantized_representation, whole.quantized_representation, what="tiled latent")
        z = whole.quantized_representation[..., :97]
        audio = ours.decode(z, tile_frames=10**6).audio_values
        audio_tiled = ours.decode(z, tile_frames=29).audio_values
    assert audio_tiled.shape == audio.shape
    assert_close(audio_tiled, audio, rtol=1e-4, what="tiled decode")


@pytest.mark.parametrize("tile_frames", [25, 50, 119])
def test_tiles_group_batch_items(tile_frames):
    """Short clips in a batch are grouped a few items to a piece; codes equal the whole-batch pass."""
    _, ours = model_pair("16khz", seed=7)
    x = torch.from_numpy(np.stack([synth_audio(320 * 40, 16000, seed=s) for s in range(3)]))[:, None]
    with torch.inference_mode():
        whole = ours.encode(x, tile_frames=10**6)
        pieces = ours.encode(x, tile_frames=tile_frames)
        assert torch.equal(pieces.audio_codes, whole.audio_codes)
        audio = ours.decode(whole.quantized_representation, tile_frames=10**6).audio_values
        audio_pieces = ours.decode(whole.quantized_representation, tile_frames=tile_frames).audio_values
    assert_close(audio_pieces, audio, rtol=1e-4, what="grouped decode")


@pytest.mark.parametrize("stride, length", [(2, 1), (3, 17), (4, 64), (5, 33), (8, 7)])
def test_polyphase_transposed_convolution(stride, length):
    from dac_fast.convolution import conv_transpose_polyphase

    torch.manual_seed(stride)
    conv = torch.nn.ConvTranspose1d(6, 5, 2 * stride, stride, padding=math.ceil(stride / 2))
    x = torch.randn(3, 6, length)
    with torch.inference_mode():
        expected = conv(x)
        got = conv_transpose_polyphase(conv, x)
        assert got.shape == expected.shape
        assert_close(got, expected, rtol=1e-6, what="polyphase")
        conv.weight.mul_(2)  # a new weight version rebuilds the phase weights
        assert_close(conv_transpose_polyphase(conv, x), conv(x), rtol=1e-6, what="polyphase after update")


@pytest.mark.parametrize("stride, channels, batch, frames", [(2, (6, 5), 1, 2), (5, (7, 3), 3, 5), (8, (96, 1024), 4, 7)])
def test_transposed_convolution_windows_folded_along_time(stride, channels, batch, frames):
    """A stream step's transposed convolution runs its B windows folded into one sequence: each window's
    inner frames equal the torch layer's samples for them (the large case takes the packed oneDNN path)."""
    from dac_fast.convolution import conv_transpose_inner_frames

    torch.manual_seed(stride)
    conv = torch.nn.ConvTranspose1d(channels[1], channels[0], 2 * stride, stride, padding=math.ceil(stride / 2))
    windows = torch.randn(batch, channels[1], frames)
    with torch.no_grad():
        full = torch.nn.functional.conv_transpose1d(windows, conv.weight, conv.bias, stride)  # no crop
        for packed in (False, True):
            got = conv_transpose_inner_frames(conv, windows, packed=packed)
            assert got.shape == (batch, channels[0], (frames - 1) * stride)
            assert_close(got, full[..., stride : frames * stride], rtol=1e-5, what=f"inner frames, packed={packed}")


def test_weight_norm_round_trip():
    _, ours = model_pair("16khz", seed=2)
    x = torch.from_numpy(synth_audio(320 * 11, 16000, seed=3))[None, None]
    with torch.inference_mode():
        before = ours.encode(x).audio_codes
    ours.apply_weight_norm()
    assert any("parametrizations" in k for k in ours.state_dict())
    with torch.inference_mode():
        assert torch.equal(ours.encode(x).audio_codes, before)
    ours.remove_weight_norm()
    assert not any("parametrizations" in k for k in ours.state_dict())


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_model():
    return DacModel.from_preset("16khz", seed=0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.zeros(320), ValueError, r"shape \(batch, 1, samples\)"),
        (lambda: torch.zeros(1, 2, 320), ValueError, r"mono audio"),
        (lambda: torch.zeros(1, 1, 320, dtype=torch.int64), TypeError, r"float audio.*or integer PCM.*int64"),
        (lambda: torch.zeros(1, 1, 0), ValueError, r"empty"),
        (lambda: torch.tensor([[[0.0, float("nan")] * 160]]), ValueError, r"NaN or Inf"),
        (lambda: torch.tensor([[[0.0, float("inf")] * 160]]), ValueError, r"NaN or Inf"),
        (lambda: [[0.0] * 320], TypeError, r"torch.Tensor"),
    ],
)
def test_bad_audio(small_model, make, error, match):
    with pytest.raises(error, match=match):
        small_model.encode(make())


@pytest.mark.parametrize("n", [0, 13, -1, 2.5, True, [4], []])
def test_bad_n_quantizers(small_model, n):
    with pytest.raises(ValueError, match=r"n_quantizers must be an integer in \[1, 12\]"):
        small_model.encode(torch.zeros(1, 1, 320), n_quantizers=n)


@pytest.mark.parametrize(
    "codes, error, match",
    [
        (torch.full((1, 12, 4), 1024), ValueError, r"\[0, 1024\).*\[1024, 1024\]"),
        (torch.full((1, 12, 4), -1), ValueError, r"\[0, 1024\)"),
        (torch.zeros(1, 13, 4, dtype=torch.long), ValueError, r"13 codebooks; this model has 12"),
        (torch.zeros(12, 4, dtype=torch.long), ValueError, r"\(batch, n_codebooks, frames\)"),
        (torch.zeros(1, 12, 4), TypeError, r"integer tensor"),
    ],
)
def test_bad_codes(small_model, codes, error, match):
    with pytest.raises(error, match=match):
        small_model.decode(audio_codes=codes)


def test_decode_needs_an_input(small_model):
    with pytest.raises(ValueError, match="Either `quantized_representation` or `audio_codes`"):
        small_model.decode()
    with pytest.raises(ValueError, match=r"shape \(batch, 1024, frames\)"):
        small_model.decode(torch.zeros(1, 3, 4))


def test_backend_switch_validation():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.backend("cuda-please"):
            pass
