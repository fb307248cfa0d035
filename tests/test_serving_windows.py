"""The Orpheus-style windowed decode mode (dac_fast.serving.windows): its window arithmetic against the loop
bench_stream ran before (7 left, 7 emitted, 14 right frames), the slotted decoder against the offline windows
and ``model.decode``, and the scheduler serving two streams with ``decode_mode="windows"``."""

import asyncio

import numpy as np
import pytest
import torch

from dac_fast import DacModel
from dac_fast.serving import Scheduler
from dac_fast.serving.windows import WindowDecoder, decode_windows, window_plan

ATOL = 1e-5
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def model():
    return DacModel.from_preset("16khz", seed=5)


def offline_windows(model, codes) -> torch.Tensor:
    """decode_windows of codes (B, n, F) -> (B, samples)."""
    with torch.inference_mode():
        return torch.cat(list(decode_windows(model, codes)), -1)


def test_window_plan_is_orpheus_arithmetic_offline_and_streamed():
    rng = np.random.default_rng(0)
    for n in [1, 6, 7, 8, 21, 22, 28, *rng.integers(29, 120, 6).tolist()]:
        # the loop bench_stream ran before windows.py: (frames decoded, first frame kept, kept to the end?)
        expected = [(max(0, first - 7), min(n, first + 21), first, min(n, first + 21) == n and first + 7 >= n)
                    for first in range(0, n, 7)]
        offline = window_plan(0, n, final=True)
        assert [(w.lo, w.hi, w.first, w.last) for w in offline] == expected
        streamed, known, emitted = [], 0, 0
        while known < n:  # frames arriving in random pieces: windows come out once their right context is in
            known = min(n, known + int(rng.integers(1, 9)))
            due = window_plan(emitted, known, final=False)
            assert all(w.hi == w.first + 21 <= known and not w.last for w in due)
            streamed += due
            emitted += 7 * len(due)
        assert streamed + window_plan(emitted, n, final=True) == offline


def test_slots_equal_offline_windows_and_batch_a_tick(model):
    gen = torch.Generator().manual_seed(1)
    pair = torch.randint(0, 1024, (2, 12, 29), generator=gen)  # slots 0 and 1, pushed in phase
    clips = [*pair, torch.randint(0, 1024, (8, 5), generator=gen)]  # slot 2: fewer codebooks, shorter than a window
    decoder = WindowDecoder(model, 3)
    calls = []
    decode = model.decode
    model.decode = lambda **kw: calls.append(kw["audio_codes"].shape) or decode(**kw)
    try:
        outs = [[], [], []]
        # slots 0 and 1 push 3 frames per tick in phase (their windows fall due on the same ticks), slot 2 its
        # 5 frames at once; then each slot flushes
        for start in range(0, 29, 3):
            inputs = {slot: decoder.check_input(slot, clip[:, start : start + 3])
                      for slot, clip in enumerate(clips[:2]) if start < clip.shape[-1]}
            if start == 0:
                inputs[2] = decoder.check_input(2, clips[2])
            before = len(calls)
            for slot, audio in enumerate(decoder.push_checked(inputs)):
                assert (audio is None) == (slot not in inputs)
                if audio is not None:
                    outs[slot].append(audio)
                    # what the scheduler's coalescing splits by: samples out so far = final_outputs(frames in)
                    assert sum(a.numel() for a in outs[slot]) == decoder.final_outputs(decoder.pushed(slot))
            if start in (18, 27):  # both slots' windows (21, then 28 frames) due: one call of batch 2, no padding
                assert calls[before:] == [torch.Size([2, 12, 21 if start == 18 else 28])]
        for slot, audio in enumerate(decoder.flush([0, 1, 2])):
            outs[slot].append(audio)
        assert decoder.flush([0])[0].numel() == 0  # freed: nothing left
    finally:
        model.decode = decode
    with torch.inference_mode():
        windowed = [*offline_windows(model, pair), *offline_windows(model, clips[2][None])]
        decoded = [*model.decode(audio_codes=pair).audio_values,
                   model.decode(audio_codes=clips[2][None]).audio_values[0]]
        for clip, parts, windows, expected in zip(clips, outs, windowed, decoded):
            audio = torch.cat(parts)
            assert audio.shape == expected.shape
            assert (audio - windows).abs().max().item() <= ATOL
            seams = (audio - expected).abs().max().item()
            if clip.shape[-1] <= 7:  # one window holds the whole stream: exact
                assert seams <= ATOL
            else:  # inexact by design at the seams, but the same audio
                assert 1e-4 < seams < 0.1 * expected.abs().max().item()


def test_scheduler_serves_two_window_streams(model):
    gen = torch.Generator().manual_seed(2)
    clips = [torch.randint(0, 1024, (12, n), generator=gen) for n in (23, 9)]
    with pytest.raises(ValueError, match="decode_mode must be one of slots, per-stream, windows, got 'orpheus'"):
        Scheduler(model, decode_mode="orpheus")

    async def client(scheduler, codes, size):
        stream = await scheduler.open_decode_stream()
        with pytest.raises(ValueError, match="slot .: codes must be a tensor of shape"):
            await stream.push(codes[0])
        outs = [await stream.push(codes[:, i : i + size]) for i in range(0, codes.shape[-1], size)]
        return torch.cat(outs + [await stream.finish()])

    async def main(scheduler):
        return await asyncio.gather(client(scheduler, clips[0], 4), client(scheduler, clips[1], 3))

    with Scheduler(model, decode_slots=2, decode_mode="windows") as scheduler:
        results = asyncio.run(main(scheduler))
        assert scheduler.metrics()["lanes"]["decode"]["active"] == 0
    for clip, audio in zip(clips, results):
        assert (audio - offline_windows(model, clip[None])[0]).abs().max().item() <= ATOL


def test_serve_decode_mode_option(capsys):
    from dac_fast.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "--model", "16khz"]).decode_mode == "slots"
    assert parse(["serve", "--model", "16khz", "--decode-mode", "windows"]).decode_mode == "windows"
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "16khz", "--decode-mode", "orpheus"])
    assert "--decode-mode: invalid choice: 'orpheus'" in capsys.readouterr().err
