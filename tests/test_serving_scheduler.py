"""The serving scheduler (dac_fast.serving.Scheduler) without a network: concurrent asyncio streams joining and
leaving at random, each checked against the offline path alone; bounds, failures and whole-file batching."""

import asyncio

import numpy as np
import pytest
import torch

from dac_fast import DacModel
from dac_fast.serving import Busy, Scheduler, StreamClosed
from tests.reference import synth_audio

ATOL = 1e-5
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def model():
    return DacModel.from_preset("16khz", seed=21)


def test_concurrent_streams_are_exact_and_batched(model):
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    hop = model.config.hop_length
    clips = [torch.randint(0, 1024, (12, int(rng.integers(4, 9))), generator=gen) for _ in range(4)]
    audios = [torch.from_numpy(synth_audio(int(rng.integers(2 * hop, 5 * hop)), 16000, seed=i)) for i in range(2)]

    async def decode_client(scheduler, codes, delay):
        await asyncio.sleep(delay)
        stream = await scheduler.open_decode_stream()
        outs, start = [], 0
        while start < codes.shape[-1]:
            size = int(rng.choice([1, 2, 4]))
            outs.append(await stream.push(codes[:, start : start + size]))
            start += size
        outs.append(await stream.finish())
        return torch.cat(outs)

    async def encode_client(scheduler, audio):
        stream = await scheduler.open_encode_stream()
        outs = [await stream.push(audio[i : i + hop]) for i in range(0, audio.shape[0], hop)]
        outs.append(await stream.finish())
        return torch.cat(outs, dim=-1)

    async def main(scheduler):
        # 4 decode clients on 2 slots: two wait for a slot, then reuse it
        return await asyncio.gather(*[decode_client(scheduler, c, 0.01 * i) for i, c in enumerate(clips)],
                                    *[encode_client(scheduler, a) for a in audios])

    with Scheduler(model, decode_slots=2, encode_slots=2, waiting=4) as scheduler:
        results = asyncio.run(main(scheduler))
        metrics = scheduler.metrics()
    with torch.inference_mode():
        for codes, audio in zip(clips, results):
            expected = model.decode(audio_codes=codes[None]).audio_values[0]
            assert audio.shape == expected.shape and (audio - expected).abs().max().item() <= ATOL
        for clip, codes in zip(audios, results[len(clips):]):
            assert torch.equal(codes, model.encode(clip[None, None]).audio_codes[0])
    assert metrics["most_tick_streams"] >= 3 and metrics["lanes"]["decode"]["active"] == 0


def test_bounds_failures_and_offline_batches(model):
    gen = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, 1024, (12, n), generator=gen) for n in (5, 3)]

    async def main(scheduler):
        first = await scheduler.open_decode_stream()
        with pytest.raises(Busy, match="1 decode slots and 0 waiting places"):
            await scheduler.open_decode_stream()
        with pytest.raises(ValueError, match=r"slot 0: .*\[0, 1024\)"):
            await first.push(codes[0] + 2000)  # bad input: refused before it reaches the thread
        good = await first.push(codes[0][:, :2])
        scheduler.fault = lambda kind: (_ for _ in ()).throw(RuntimeError("injected"))
        with pytest.raises(StreamClosed, match="injected"):
            await first.push(codes[0][:, 2:])
        with pytest.raises(StreamClosed):
            await first.push(codes[0][:, 2:])  # the failed stream stays closed
        scheduler.fault = None
        second = await scheduler.open_decode_stream()  # its slot was freed; the scheduler goes on
        out = torch.cat([await second.push(codes[1]), await second.finish()])
        offline = await asyncio.gather(scheduler.decode(codes[0]), scheduler.decode(codes[1]))
        return good, out, offline

    with Scheduler(model, decode_slots=1, encode_slots=1, waiting=0) as scheduler:
        good, out, offline = asyncio.run(main(scheduler))
        assert scheduler.failed_ticks == 1
    with torch.inference_mode():
        expected = [model.decode(audio_codes=c[None]).audio_values[0] for c in codes]
    assert (out - expected[1]).abs().max().item() <= ATOL
    for audio, exp in zip(offline, expected):
        assert audio.shape == exp.shape and (audio - exp).abs().max().item() <= ATOL


def test_one_streams_bad_push_fails_only_that_push(model):
    # a codebook count that changes between two queued pushes, or NaN audio in a whole-file request, is refused
    # when queued: the other streams' pushes and requests of that tick go on
    gen = torch.Generator().manual_seed(3)
    good = torch.randint(0, 1024, (12, 6), generator=gen)
    clip = torch.from_numpy(synth_audio(13 * model.config.hop_length, 16000, seed=4))

    async def main(scheduler):
        bad_stream = await scheduler.open_decode_stream()
        good_stream = await scheduler.open_decode_stream()
        first = asyncio.ensure_future(bad_stream.push(good[:, :2]))
        await asyncio.sleep(0)  # queued, not yet run by the scheduler's tick
        with pytest.raises(ValueError, match="codes have 5 codebooks; its earlier pushes had 12"):
            await bad_stream.push(good[:5, 2:4])
        outs = [await good_stream.push(good[:, :3]), await good_stream.push(good[:, 3:]), await good_stream.finish()]
        await first
        with pytest.raises(ValueError, match="NaN or Inf"):
            await scheduler.encode(torch.full((800,), float("nan")))
        return torch.cat(outs), await scheduler.encode(clip)

    with Scheduler(model, decode_slots=2, encode_slots=1) as scheduler:
        audio, codes = asyncio.run(main(scheduler))
    with torch.inference_mode():
        expected = model.decode(audio_codes=good[None]).audio_values[0]
        assert (audio - expected).abs().max().item() <= ATOL
        assert torch.equal(codes, model.encode(clip[None, None]).audio_codes[0])


@pytest.mark.parametrize("coalesce", [1, 3])
def test_queued_pushes_run_as_one_and_each_gets_its_own_reply(model, coalesce):
    """A pipelining client's queued pushes are coalesced into one model push; each request's reply is exactly
    what it gets pushed alone (lengths equal, values within rounding), decode and encode."""
    from dac_fast.slots import SlotDecoder, SlotEncoder

    gen = torch.Generator().manual_seed(5)
    hop = model.config.hop_length
    codes = torch.randint(0, 1024, (12, 23), generator=gen)
    decode_sizes = [1, 3, 2, 5, 1, 4, 7]
    audio = torch.from_numpy(synth_audio(20 * hop + 37, 16000, seed=5))
    encode_sizes = [301, 977, 1500, 64, 2049, audio.shape[0] - 4891]

    def pieces(tensor, sizes):
        edges = np.cumsum([0, *sizes])
        return [tensor[..., a:b] for a, b in zip(edges[:-1], edges[1:])]

    async def pipelined(scheduler, kind, inputs):
        stream = await (scheduler.open_decode_stream() if kind == "decode" else scheduler.open_encode_stream())
        futures = [stream.submit(x) for x in inputs]  # all queued before the thread can take the first
        replies = [await f for f in futures]
        return replies, await stream.finish()

    with Scheduler(model, decode_slots=1, encode_slots=1, coalesce=coalesce) as scheduler:
        scheduler._lock.acquire()  # hold the thread until every push is queued
        try:
            loop = asyncio.new_event_loop()
            dec = loop.create_task(pipelined(scheduler, "decode", pieces(codes, decode_sizes)))
            enc = loop.create_task(pipelined(scheduler, "encode", pieces(audio, encode_sizes)))
            loop.call_later(0.2, scheduler._lock.release)
            (dec_replies, dec_rest), (enc_replies, enc_rest) = loop.run_until_complete(asyncio.gather(dec, enc))
            loop.close()
        finally:
            if scheduler._lock._is_owned():
                scheduler._lock.release()
        ticks = scheduler.metrics()["ticks"]
    alone_dec, alone_enc = SlotDecoder(model, 1), SlotEncoder(model, 1)
    for piece, reply in zip(pieces(codes, decode_sizes), dec_replies):
        alone = alone_dec.push([piece])[0]
        assert reply.shape == alone.shape
        if alone.numel():
            assert (reply - alone).abs().max().item() <= ATOL
    for piece, reply in zip(pieces(audio, encode_sizes), enc_replies):
        assert torch.equal(reply, alone_enc.push([piece])[0])
    with torch.inference_mode():
        whole = model.decode(audio_codes=codes[None]).audio_values[0]
        assert (torch.cat([*dec_replies, dec_rest]) - whole).abs().max().item() <= ATOL
        assert torch.equal(torch.cat([*enc_replies, enc_rest], -1), model.encode(audio[None, None]).audio_codes[0])
    # 7 decode pushes in groups of at most 3 -> 3 ticks, then one for the finishes (or fewer with the encodes);
    # without coalescing one tick per push
    assert ticks <= 4 if coalesce == 3 else ticks >= 7, ticks


def test_scheduler_options_are_checked(model):
    for options, word in (({"coalesce": 0}, "coalesce"), ({"coalesce": True}, "coalesce"),
                          ({"gather_s": -1}, "gather_s"), ({"gather_s": "1"}, "gather_s")):
        with pytest.raises(ValueError, match=word):
            Scheduler(model, **options)
