"""Exact streaming (dac_fast.streaming) and right-padded batches (encode(padding_mask=), decode(audio_frames=)).

Streams are compared with the offline path on random splits (1-frame and 1-sample pushes, splits inside a hop,
odd lengths), on every preset, and with transformers' DacModel; the codes must be identical, the audio equal to
fp32 rounding. Short inputs keep it fast (the presets are full size).
"""

import copy
import pickle

import numpy as np
import pytest
import torch

from dac_fast import DacConfig, DacFeatureExtractor, DacModel
from dac_fast.convolution import PACKED_WEIGHTS as packed_weights
from dac_fast.tiles import decoded_length, decoder_reach, encoded_frames, encoder_reach
from tests.reference import model_pair, synth_audio

ATOL = 1e-5  # decoded audio lies in [-1, 1] (tanh)
PRESETS = ("16khz", "24khz", "44khz", "44khz_16kbps")
_models = {}


def model_for(preset: str) -> DacModel:
    if preset not in _models:
        _models[preset] = DacModel.from_preset(preset, seed=5)
    return _models[preset]


def random_splits(total: int, rng: np.random.Generator, first: tuple = (1,), largest: int = 6) -> list:
    """Push sizes covering ``total``: ``first`` then random sizes in [1, largest]."""
    sizes = list(first)
    while sum(sizes) < total:
        sizes.append(int(rng.integers(1, largest + 1)))
    while sum(sizes) - sizes[-1] >= total:
        sizes.pop()
    sizes[-1] -= sum(sizes) - total
    return sizes


def stream_decode(dec, codes: torch.Tensor, sizes: list) -> torch.Tensor:
    assert sum(sizes) == codes.shape[-1]
    outs, start = [], 0
    for size in sizes:
        out = dec.push(codes[..., start : start + size])
        start += size
        # released exactly what the receptive field allows: all samples up to frames * hop - lookahead
        assert out.shape[0] == codes.shape[0]
        assert dec.released == max(0, start * dec.config.hop_length - dec.lookahead_samples)
        outs.append(out)
    outs.append(dec.flush())
    return torch.cat(outs, dim=-1)


def stream_encode(enc, audio: torch.Tensor, sizes: list) -> torch.Tensor:
    assert sum(sizes) == audio.shape[-1]
    hop = enc.config.hop_length
    outs, start = [], 0
    for size in sizes:
        outs.append(enc.push(audio[..., start : start + size]))
        start += size
        # frame f is returned once samples through f * hop + lookahead_samples are in
        released = sum(o.shape[-1] for o in outs)
        assert released == max(0, -(-(start - enc.lookahead_samples) // hop))
    outs.append(enc.flush())
    return torch.cat(outs, dim=-1)


def random_codes(model: DacModel, batch: int, frames: int, seed: int, n: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = n or model.config.n_codebooks
    return torch.randint(0, model.config.codebook_size, (batch, n, frames), generator=gen)


def test_lookahead_per_preset():
    """The documented lookahead (README) comes from decoder_reach / encoder_reach."""
    expected = {"16khz": (10, 3141, 2812), "24khz": (10, 3141, 2812), "44khz": (10, 4757, 4244),
                "44khz_16kbps": (10, 4757, 4244)}
    for preset, (frames, dec_samples, enc_samples) in expected.items():
        config = DacConfig.from_preset(preset)
        assert decoder_reach(config)[1] == dec_samples and encoder_reach(config)[1] == enc_samples
        assert -(-dec_samples // config.hop_length) == frames


@pytest.mark.parametrize("preset", PRESETS)
def test_streaming_decoder_matches_offline(preset):
    model = model_for(preset)
    rng = np.random.default_rng(len(preset))
    frames = 13 + len(preset) % 3
    n = model.config.n_codebooks - 1 if preset == "44khz" else None  # fewer codebooks than the model has
    codes = random_codes(model, 2, frames, seed=len(preset), n=n)
    with torch.inference_mode():
        expected = model.decode(audio_codes=codes).audio_values
    audio = stream_decode(model.streaming_decoder(batch_size=2), codes, random_splits(frames, rng))
    assert audio.shape == expected.shape == (2, decoded_length(model.config, frames))
    assert (audio - expected).abs().max().item() <= ATOL
    assert expected.abs().max().item() > 0.05, "non-trivial audio"


def test_streaming_decoder_one_frame_pushes_and_restart():
    model = model_for("16khz")
    codes = random_codes(model, 1, 11, seed=1)
    with torch.inference_mode():
        expected = model.decode(audio_codes=codes).audio_values
    dec = model.streaming_decoder()
    for _ in range(2):  # reset() after flush starts over
        audio = stream_decode(dec, codes, [1] * 11)
        assert audio.shape == expected.shape and (audio - expected).abs().max().item() <= ATOL
        dec.reset()


def test_streaming_decoder_reset_one_stream_midway():
    """A server reuses slot 1 for a new request while slot 0 goes on."""
    model = model_for("16khz")
    hop = model.config.hop_length
    first, second = random_codes(model, 2, 16, seed=2), random_codes(model, 1, 8, seed=3)
    dec = model.streaming_decoder(batch_size=2)
    outs = [dec.push(first[..., :3]), dec.push(first[..., 3:7]), dec.push(first[..., 7:8])]
    lead_in = dec.reset(torch.tensor([False, True]))
    assert lead_in == 8 * hop - dec.released
    pushed = first[..., 8:].clone()
    pushed[1:] = second  # slot 1's new request: 8 frames, ending with the batch
    outs += [dec.push(pushed[..., :1]), dec.push(pushed[..., 1:8]), dec.flush()]
    audio = torch.cat(outs, dim=-1)
    with torch.inference_mode():
        expected0 = model.decode(audio_codes=first).audio_values[0]
        expected1 = model.decode(audio_codes=second).audio_values[0]
    assert (audio[0] - expected0).abs().max().item() <= ATOL
    released_before = 8 * hop - lead_in
    assert torch.all(audio[1, released_before : released_before + lead_in] == 0)
    new = audio[1, released_before + lead_in :]
    assert new.shape == expected1.shape
    assert (new - expected1).abs().max().item() <= ATOL


def test_streaming_decoder_packed_weights_keep_model_copyable():
    """The stream's packed oneDNN weights (large layers) live beside the model: after streaming the model still
    deep-copies and pickles, and the copy streams the same audio."""
    model = DacModel.from_preset("16khz", seed=11)
    codes = random_codes(model, 1, 9, seed=12)
    audio = stream_decode(model.streaming_decoder(), codes, [4, 5])
    if model.device.type == "cpu" and torch.backends.mkldnn.is_available():
        assert any(owner in packed_weights for owner in model.decoder.modules())
    clone = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    again = stream_decode(clone.streaming_decoder(), codes, [2, 7])
    assert (again - audio).abs().max().item() <= ATOL


def test_streaming_decoder_under_weight_norm():
    """A model with weight norm applied (as for training) streams too; its weights are rebuilt per call, so
    nothing is packed or cached for them."""
    model = DacModel.from_preset("16khz", seed=14)
    model.apply_weight_norm()
    model.eval()
    codes = random_codes(model, 1, 13, seed=15)
    with torch.inference_mode():
        expected = model.decode(audio_codes=codes).audio_values
    audio = stream_decode(model.streaming_decoder(), codes, [6, 1, 6])
    assert (audio - expected).abs().max().item() <= ATOL
    assert not any(owner in packed_weights for owner in model.decoder.modules())


def test_streams_settle_after_a_restart():
    """Once the restarted streams' lookahead has passed, the restart points are forgotten (pushes run unmasked
    again) and every stream stays exact: decoder audio and encoder codes of both slots."""
    model = model_for("16khz")
    sr, hop = model.config.sampling_rate, model.config.hop_length
    first, second = random_codes(model, 2, 40, seed=16), random_codes(model, 1, 34, seed=17)
    dec = model.streaming_decoder(batch_size=2)
    outs = [dec.push(first[..., :6])]
    lead_in = dec.reset([1])
    pushed = first[..., 6:].clone()
    pushed[1:] = second
    settled_at = None
    for start in range(0, 34, 4):
        outs.append(dec.push(pushed[..., start : start + 4]))
        if settled_at is None and dec._layers.starts is None:
            settled_at = start
    outs.append(dec.flush())
    assert settled_at is not None and settled_at < 30
    audio = torch.cat(outs, dim=-1)
    with torch.inference_mode():
        expected0 = model.decode(audio_codes=first).audio_values[0]
        expected1 = model.decode(audio_codes=second).audio_values[0]
    assert (audio[0] - expected0).abs().max().item() <= ATOL
    assert torch.all(audio[1, 6 * hop - lead_in : 6 * hop] == 0)  # the lead-in before the new request's audio
    new = audio[1, 6 * hop :]
    assert new.shape == expected1.shape and (new - expected1).abs().max().item() <= ATOL

    long = torch.from_numpy(synth_audio(40 * hop + 21, sr, seed=18))
    newer = torch.from_numpy(synth_audio(34 * hop + 21, sr, seed=19))
    enc = model.streaming_encoder(batch_size=2)
    audio = torch.stack([long, torch.cat([long[: 6 * hop], newer])])[:, None]
    outs = [enc.push(audio[..., : 6 * hop])]
    dropped = enc.reset([1])
    settled = False
    for start in range(6 * hop, audio.shape[-1], 4 * hop):
        outs.append(enc.push(audio[..., start : start + 4 * hop]))
        settled |= enc._layers.starts is None
    outs.append(enc.flush())
    codes = torch.cat(outs, dim=-1)
    with torch.inference_mode():
        assert torch.equal(codes[0], model.encode(long[None, None]).audio_codes[0])
        assert torch.equal(codes[1, :, 6:], model.encode(newer[None, None]).audio_codes[0])
    assert settled and torch.all(codes[1, :, 6 - dropped : 6] == -1)


def test_streaming_decoder_matches_transformers():
    hf, ours = model_pair("16khz", seed=7)
    codes = random_codes(ours, 2, 12, seed=4)
    with torch.inference_mode():
        expected = hf.decode(audio_codes=codes).audio_values
    audio = stream_decode(ours.streaming_decoder(batch_size=2), codes, [2, 1, 5, 4])
    assert audio.shape == expected.shape and (audio - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streaming_decoder_half_precision(dtype):
    """Like decode: in bf16/fp16 the stream is as close to the fp32 decode as the offline decode is."""
    model = DacModel.from_preset("16khz", seed=5, dtype=dtype)
    codes = random_codes(model, 1, 12, seed=5)
    with torch.inference_mode():
        offline = model.decode(audio_codes=codes).audio_values.float()
        exact = model_for("16khz").decode(audio_codes=codes).audio_values
    audio = stream_decode(model.streaming_decoder(), codes, [1, 6, 5]).float()
    assert audio.dtype == torch.float32 and audio.shape == exact.shape
    tolerance = max(2 * (offline - exact).abs().max().item(), 1e-3)
    assert (audio - exact).abs().max().item() <= tolerance


@pytest.mark.parametrize("preset", PRESETS)
def test_streaming_encoder_codes_identical(preset):
    model = model_for(preset)
    sr, hop = model.config.sampling_rate, model.config.hop_length
    rng = np.random.default_rng(len(preset) + 1)
    length = 11 * hop + int(rng.integers(1, hop))  # a partial last hop
    audio = torch.from_numpy(np.stack([synth_audio(length, sr, seed=1), synth_audio(length, sr, seed=2)]))[:, None]
    with torch.inference_mode():
        expected = model.encode(audio).audio_codes
    # single samples, splits inside a hop, a push spanning several hops
    sizes = random_splits(length, rng, (1, 1, 1, hop - 5, 7, hop // 3 + 1, 3 * hop + 11), 2 * hop)
    codes = stream_encode(model.streaming_encoder(batch_size=2), audio, sizes)
    assert codes.shape == expected.shape and expected.shape[-1] == encoded_frames(model.config, length)
    assert torch.equal(codes, expected)


def test_streaming_encoder_matches_transformers_and_n_quantizers():
    hf, ours = model_pair("16khz", seed=7)
    sr, hop = ours.config.sampling_rate, ours.config.hop_length
    audio = torch.from_numpy(np.stack([synth_audio(9 * hop + 77, sr, seed=3), synth_audio(9 * hop + 77, sr, seed=4)]))
    audio = audio[:, None]
    with torch.inference_mode():
        expected = hf.encode(audio, n_quantizers=5).audio_codes
    codes = stream_encode(ours.streaming_encoder(batch_size=2, n_quantizers=5), audio, [hop + 1, 5, 4 * hop, 4 * hop + 71])
    assert codes.shape[1] == 5 and torch.equal(codes, expected)


def test_streaming_encoder_reset_one_stream_midway():
    """Slot 1 starts a new request on a frame boundary while slot 0 goes on; its codes equal the new request
    encoded alone, the old request's frames still in flight come back as -1, as many as reset() said."""
    model = model_for("16khz")
    sr, hop = model.config.sampling_rate, model.config.hop_length
    long = torch.from_numpy(synth_audio(14 * hop + 33, sr, seed=8))
    old, new = torch.from_numpy(synth_audio(6 * hop, sr, seed=9)), torch.from_numpy(synth_audio(8 * hop + 33, sr, seed=10))
    enc = model.streaming_encoder(batch_size=2)
    audio = torch.stack([long, torch.cat([old, new])])[:, None]
    outs = [enc.push(audio[..., : 2 * hop + 17]), enc.push(audio[..., 2 * hop + 17 : 6 * hop])]
    before = sum(o.shape[-1] for o in outs)
    off_grid = model.streaming_encoder(batch_size=2)
    off_grid.push(audio[..., : hop + 3])
    with pytest.raises(ValueError, match="frame boundary"):
        off_grid.reset([1])
    assert off_grid._layers.starts is None  # refused whole: nothing restarted
    dropped = enc.reset(torch.tensor([False, True]))
    assert dropped == 6 - before
    outs += [enc.push(audio[..., 6 * hop : 9 * hop + 1]), enc.push(audio[..., 9 * hop + 1 :]), enc.flush()]
    codes = torch.cat(outs, dim=-1)
    with torch.inference_mode():
        expected0 = model.encode(long[None, None]).audio_codes[0]
        expected_old = model.encode(old[None, None]).audio_codes[0]
        expected_new = model.encode(new[None, None]).audio_codes[0]
    assert torch.equal(codes[0], expected0)
    assert torch.equal(codes[1, :, :before], expected_old[:, :before])
    assert torch.all(codes[1, :, before:6] == -1)
    assert torch.equal(codes[1, :, 6:], expected_new)


def test_streaming_encoder_input_shorter_than_a_frame_is_padded_like_encode():
    """encode() zero-pads an input too short for one frame to one hop; a stream that ends that short does too."""
    model = model_for("16khz")
    for length in (1, 37, 200):
        audio = torch.from_numpy(synth_audio(length, model.config.sampling_rate, seed=length))[None, None]
        with torch.inference_mode():
            expected = model.encode(audio).audio_codes
        codes = stream_encode(model.streaming_encoder(), audio, [length])
        assert expected.shape[-1] == 1 and torch.equal(codes, expected)


def test_streaming_bad_input_is_rejected_and_changes_nothing():
    model = model_for("16khz")
    codes = random_codes(model, 2, 12, seed=6)
    with torch.inference_mode():
        expected = model.decode(audio_codes=codes).audio_values
    dec = model.streaming_decoder(batch_size=2)
    outs = [dec.push(codes[..., :3])]
    bad = [
        (codes[0], ValueError, "shape"),  # wrong rank
        (codes[:1, :, 3:5], ValueError, "streams"),  # mismatched batch
        (codes[:, :5, 3:5], ValueError, "codebooks"),  # codebook count changed
        (torch.cat([codes, codes[:, :1]], 1)[..., 3:5], ValueError, "codebooks"),  # more than the model has
        (codes[..., 3:5].float(), TypeError, "integer"),
        (codes[..., 3:5] + 1024, ValueError, r"\[0, 1024\)"),  # out of range
        (codes[..., 3:3], ValueError, "empty"),
    ]
    for value, error, message in bad:
        with pytest.raises(error, match=message):
            dec.push(value)
    outs += [dec.push(codes[..., 3:12]), dec.flush()]
    audio = torch.cat(outs, dim=-1)
    assert audio.shape == expected.shape and (audio - expected).abs().max().item() <= ATOL
    with pytest.raises(RuntimeError, match="push after flush"):
        dec.push(codes[..., :1])
    with pytest.raises(ValueError, match="stream indices"):
        model.streaming_decoder(batch_size=2).reset([2])
    with pytest.raises(ValueError, match="batch_size"):
        model.streaming_decoder(batch_size=0)

    enc = model.streaming_encoder(batch_size=2)
    audio = torch.zeros(2, 1, 400)
    for value, error, message in [(audio[0], ValueError, "shape"), (audio[:1], ValueError, "streams"),
                                  (audio[..., :0], ValueError, "empty"), (audio.long(), TypeError, "floating"),
                                  (audio / 0, ValueError, "NaN")]:
        with pytest.raises(error, match=message):
            enc.push(value)
    assert enc.samples == 0 and enc._layers.context == {}
    enc.push(audio)
    enc.flush()
    with pytest.raises(RuntimeError, match="push after flush"):
        enc.push(audio)
    with pytest.raises(ValueError, match="n_quantizers"):
        model.streaming_encoder(n_quantizers=13)


# ----------------------------------------------------------------------------- right-padded batches
def clips_for(config, seconds=(0.23, 0.11, 0.17)):
    sr = config.sampling_rate
    return [synth_audio(int(s * sr) + 3 * i + 1, sr, seed=10 + i) for i, s in enumerate(seconds)]


@pytest.mark.parametrize("tile_frames", [None, 7])
def test_padding_mask_codes_equal_each_item_alone(tile_frames):
    model = model_for("16khz")
    clips = clips_for(model.config)
    fe = DacFeatureExtractor.from_config(model.config)
    inputs = fe(clips, sampling_rate=model.config.sampling_rate, return_tensors="pt")
    with torch.inference_mode():
        out = model.encode(inputs["input_values"], padding_mask=inputs["padding_mask"], tile_frames=tile_frames)
        assert list(out.keys())[-1] == "audio_frames" and len(out.to_tuple()) == 5
        frames = out.audio_frames.tolist()
        hop = model.config.hop_length
        assert frames == [-(-len(c) // hop) for c in clips]
        # "alone" is the single-clip path: the extractor zero-pads the clip to whole hops
        alone = [model.encode(fe(c, sampling_rate=model.config.sampling_rate, return_tensors="pt").input_values,
                              tile_frames=tile_frames).audio_codes for c in clips]
        for b, codes in enumerate(alone):
            assert torch.equal(out.audio_codes[b, :, : frames[b]], codes[0])
        # decoding with the frame counts: each item as decoded alone, zero after its own length
        audio = model.decode(audio_codes=out.audio_codes, audio_frames=out.audio_frames,
                             tile_frames=tile_frames).audio_values
        for b, codes in enumerate(alone):
            expected = model.decode(audio_codes=codes, tile_frames=tile_frames).audio_values[0]
            assert (audio[b, : expected.shape[-1]] - expected).abs().max().item() <= ATOL
            assert torch.all(audio[b, expected.shape[-1] :] == 0)
        # without padding_mask nothing changes
        plain = model.encode(inputs["input_values"])
        assert len(plain.to_tuple()) == 4 and plain.audio_frames is None


def test_codes_batch_invariant():
    """An item's codes are the same alone and inside batches of any size, equal lengths too (CPU)."""
    model = model_for("24khz")
    sr = model.config.sampling_rate
    clips = torch.from_numpy(np.stack([synth_audio(int(0.12 * sr) + 5, sr, seed=20 + i) for i in range(3)]))[:, None]
    with torch.inference_mode():
        alone = model.encode(clips[:1]).audio_codes
        for batch in (clips[:2], clips, clips.flip(0)[1:]):
            index = next(i for i in range(batch.shape[0]) if torch.equal(batch[i], clips[0]))
            assert torch.equal(model.encode(batch).audio_codes[index], alone[0])


def test_padding_mask_bad_input():
    model = model_for("16khz")
    x = torch.zeros(2, 1, 900)
    mask = torch.ones(2, 900, dtype=torch.long)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="shape"):
            model.encode(x, padding_mask=mask[:, :10])
        hole = mask.clone()
        hole[0, 5] = 0
        with pytest.raises(ValueError, match="right padding"):
            model.encode(x, padding_mask=hole)
        with pytest.raises(ValueError, match="0 .padding. and 1"):
            model.encode(x, padding_mask=mask * 2)
        codes = random_codes(model, 2, 4, seed=0)
        with pytest.raises(ValueError, match="audio_frames must lie"):
            model.decode(audio_codes=codes, audio_frames=torch.tensor([4, 5]))
        with pytest.raises(ValueError, match="integer tensor of shape"):
            model.decode(audio_codes=codes, audio_frames=torch.tensor([4.0, 2.0]))


# On CUDA, streams and padded batches against the offline call are measured, not asserted (cuDNN may pick
# other algorithms for other shapes): scripts/cuda_agreement.py, the device check's agreement step.
