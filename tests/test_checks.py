"""dac_fast.checks: every check of what users pass to the model and its streams, each message naming the argument
and what was expected (the model's own tests call these through encode/decode; here each check alone)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dac_fast.checks import (
    DeviceChecks,
    check_audio,
    check_audio_frames,
    check_codes,
    check_latent,
    check_n_quantizers,
    check_padding_mask,
    check_tile_frames,
)

CONFIG = SimpleNamespace(n_codebooks=4, codebook_size=1024)


def run(check, *args, inference=None):
    """``check(*args, queue[, inference])`` then the queue's one read-back, as encode/decode run them (on the
    CPU a queued check runs at once)."""
    queue = DeviceChecks()
    result = check(*args, queue) if inference is None else check(*args, queue, inference)
    queue.run()
    return result


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16, torch.int32, torch.int64])
def test_codes_of_every_integer_dtype_come_back_int64(dtype):
    high = 255 if dtype == torch.uint8 else 1023
    codes = torch.from_numpy(np.random.default_rng(3).integers(0, high + 1, (2, 3, 7))).to(dtype)
    out = run(check_codes, codes, CONFIG)
    assert out.dtype == torch.int64 and torch.equal(out, codes.long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_codes_of_float_or_bool_are_refused_naming_the_dtype(dtype):
    with pytest.raises(TypeError, match=f"audio_codes must be an integer tensor, got dtype {dtype}"):
        check_codes(torch.zeros(1, 2, 3, dtype=dtype), CONFIG)


def test_codes_shape_count_and_range():
    with pytest.raises(ValueError, match=r"shape \(batch, n_codebooks, frames\), got \(2, 3\)"):
        check_codes(torch.zeros(2, 3, dtype=torch.long), CONFIG)
    with pytest.raises(ValueError, match="audio_codes has 5 codebooks; this model has 4"):
        check_codes(torch.zeros(1, 5, 3, dtype=torch.long), CONFIG)
    codes = torch.zeros(1, 2, 3, dtype=torch.int16)
    codes[0, 1, 2] = 1024
    with pytest.raises(ValueError, match=r"must lie in \[0, 1024\), got values in \[0, 1024\]"):
        run(check_codes, codes, CONFIG)
    codes[0, 1, 2] = -1
    with pytest.raises(ValueError, match=r"got values in \[-1, 0\]"):
        check_codes(codes, CONFIG)  # no queue: read at once


def test_n_quantizers_and_tile_frames():
    assert check_n_quantizers(None, 4) == 4
    assert check_n_quantizers(torch.tensor(3), 4) == 3
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"n_quantizers must be an integer in \[1, 4\]"):
            check_n_quantizers(bad, 4)
    assert check_tile_frames(7) == 7
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="tile_frames must be a positive number of frames"):
            check_tile_frames(bad)


def test_latent_shape_and_dtype():
    check_latent(torch.zeros(2, 8, 3), 8)
    with pytest.raises(ValueError, match=r"quantized_representation must have shape \(batch, 8, frames\), got \(2, 7, 3\)"):
        check_latent(torch.zeros(2, 7, 3), 8)
    with pytest.raises(TypeError, match="must be floating point, got dtype torch.int64"):
        check_latent(torch.zeros(2, 8, 3, dtype=torch.long), 8)


def test_padding_mask_lengths_and_its_mistakes():
    audio = torch.zeros(3, 1, 11)
    lengths = torch.tensor([11, 4, 1])
    mask = (torch.arange(11) < lengths[:, None]).long()
    assert torch.equal(_padding(mask, audio), lengths)
    with pytest.raises(ValueError, match=r"shape \(batch, samples\) = \(3, 11\), got \(3, 10\)"):
        _padding(mask[:, :10], audio)
    with pytest.raises(ValueError, match=r"inference only: call model.eval\(\) and run under torch.inference_mode"):
        _padding(mask, audio, inference=False)
    holes = mask.clone()
    holes[0, 5] = 0
    with pytest.raises(ValueError, match="must mark right padding"):
        _padding(holes, audio)
    with pytest.raises(ValueError, match="must hold only 0"):
        _padding(mask * 2, audio)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"gives an item no samples \(items \[2\]\)"):
        _padding(empty, audio)


def _padding(mask, audio, inference=True):
    return run(check_padding_mask, mask, audio, inference=inference)


def test_audio_frames_range():
    codes = torch.zeros(2, 3, 9, dtype=torch.long)
    assert torch.equal(run(check_audio_frames, torch.tensor([9, 1]), codes, inference=True), torch.tensor([9, 1]))
    with pytest.raises(ValueError, match=r"audio_frames must lie in \[1, 9\], got \[10, 1\]"):
        run(check_audio_frames, torch.tensor([10, 1]), codes, inference=True)
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\)"):
        check_audio_frames(torch.tensor([9.0, 1.0]), codes, DeviceChecks(), True)


def test_audio_is_scaled_and_checked():
    pcm = torch.tensor([[[-32768, 0, 16384]]], dtype=torch.int16)
    assert torch.equal(run(check_audio, pcm), torch.tensor([[[-1.0, 0.0, 0.5]]]))
    with pytest.raises(ValueError, match=r"\(batch, 1, samples\) \(mono audio\), got \(1, 2, 3\)"):
        check_audio(torch.zeros(1, 2, 3), DeviceChecks())
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        run(check_audio, torch.tensor([[[0.0, float("nan")]]]))
