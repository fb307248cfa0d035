"""The CPU buffer cache (csrc/cpu/buffer_cache.cpp, dac_fast.buffer_cache.cpu_buffer_cache): reuse, scope, bounds,
threads, and identical model outputs with it on and off."""

import gc
import threading
import time

import pytest
import torch

from dac_fast import buffer_cache, ops

from tests.reference import model_pair, synth_audio

C = ops._C
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "buffer_cache_enter"), reason="extension not built")

MB = 1 << 20


@pytest.fixture(autouse=True)
def no_open_scope():
    """The cache is process-wide and every test here counts its bytes: wait until no other scope is open (a
    streaming object of an earlier test releases its hold when collected; another test's background thread
    ends its call), else skip with the reason."""
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        torch.empty(MB)  # freed at once: cached only if some scope is open
        if C.buffer_cache_bytes() == 0:
            return
        if time.monotonic() > deadline:
            pytest.skip("another buffer cache scope stayed open in this process")
        time.sleep(0.1)


def test_freed_buffers_are_reused_inside_the_scope_only():
    x = torch.empty(0)
    with buffer_cache.cpu_buffer_cache(x):
        a = torch.empty(3 * MB // 4)  # 3 MB
        ptr = a.data_ptr()
        del a
        assert C.buffer_cache_bytes() >= 3 * MB
        b = torch.empty(3 * MB // 4 - 100)  # a slightly smaller request takes the same block
        assert b.data_ptr() == ptr
        assert C.buffer_cache_bytes() == 0
        b.fill_(7.0)
    # a tensor made inside outlives the scope intact, and its memory is freed (not cached) afterwards
    assert C.buffer_cache_bytes() == 0
    assert bool((b == 7.0).all())
    del b
    assert C.buffer_cache_bytes() == 0
    c = torch.empty(3 * MB // 4)
    c.fill_(1.0)  # torch's own allocator is back
    del c
    assert C.buffer_cache_bytes() == 0


def test_blocks_far_larger_than_the_request_are_not_used():
    with buffer_cache.cpu_buffer_cache(torch.empty(0)):
        big = torch.empty(4 * MB)  # 16 MB
        ptr = big.data_ptr()
        del big
        small = torch.empty(MB // 4)  # 1 MB: would waste 15 MB
        assert small.data_ptr() != ptr
        # and it is freed: keeping it would take the scope's memory past its 16 MB peak in use
        assert C.buffer_cache_bytes() == 0
        del small
        assert C.buffer_cache_bytes() >= MB


def test_nested_scopes_free_on_the_outermost_exit():
    x = torch.empty(0)
    with buffer_cache.cpu_buffer_cache(x):
        with buffer_cache.cpu_buffer_cache(x):
            a = torch.empty(MB)
            del a
        assert C.buffer_cache_bytes() >= 4 * MB  # inner exit keeps the cache
        a = torch.empty(MB)
        del a
    assert C.buffer_cache_bytes() == 0


def test_cache_is_bounded_by_the_peak_in_use(monkeypatch):
    monkeypatch.setenv("DAC_FAST_CPU_CACHE_MB", "1")
    # the floor is read once per process by the C++ side; the bound that matters here is the peak in use
    with buffer_cache.cpu_buffer_cache(torch.empty(0)):
        held = [torch.empty(MB) for _ in range(4)]  # 16 MB in use at once
        peak = sum(t.numel() * 4 for t in held)
        del held
        assert C.buffer_cache_bytes() <= max(peak, 64 * MB)
        for n in range(1, 40):  # many distinct sizes, never more than one alive
            t = torch.empty(n * MB // 8)
            del t
        assert C.buffer_cache_bytes() <= max(peak, 64 * MB)  # the default floor, read once per process


def test_off_switch_and_non_cpu(monkeypatch):
    monkeypatch.setenv("DAC_FAST_CPU_CACHE_MB", "0")
    with buffer_cache.cpu_buffer_cache(torch.empty(0)):
        a = torch.empty(MB)
        del a
        assert C.buffer_cache_bytes() == 0
    monkeypatch.delenv("DAC_FAST_CPU_CACHE_MB")
    with buffer_cache.cpu_buffer_cache(torch.empty(0, device="meta")):
        a = torch.empty(MB)
        del a
        assert C.buffer_cache_bytes() == 0


def test_model_outputs_identical_with_and_without_cache(monkeypatch):
    hf, ours = model_pair("16khz", seed=3)
    x = torch.from_numpy(synth_audio(16000 * 3 + 77, 16000, seed=5))[None, None]
    with torch.inference_mode():
        ref = hf.encode(x)
        on = ours.encode(x, tile_frames=40)
        on_audio = ours.decode(on.quantized_representation, tile_frames=40).audio_values
        monkeypatch.setenv("DAC_FAST_CPU_CACHE_MB", "0")
        off = ours.encode(x, tile_frames=40)
        off_audio = ours.decode(off.quantized_representation, tile_frames=40).audio_values
    assert torch.equal(on.audio_codes, ref.audio_codes)
    assert torch.equal(on.audio_codes, off.audio_codes)
    assert torch.equal(on_audio, off_audio)
    assert C.buffer_cache_bytes() == 0


def test_concurrent_calls_from_threads():
    _, ours = model_pair("16khz", seed=4)
    xs = [torch.from_numpy(synth_audio(16000 * 2 + 31 * k, 16000, seed=k))[None, None] for k in range(4)]
    with torch.inference_mode():
        expected = [ours.encode(x, tile_frames=30).audio_codes for x in xs]

    def work(k):
        with torch.inference_mode():
            return [ours.encode(xs[k], tile_frames=30).audio_codes for _ in range(2)][-1]

    for got, want in zip(in_threads(work, len(xs)), expected):
        assert torch.equal(got, want)
    assert C.buffer_cache_bytes() == 0


def in_threads(work, n: int) -> list:
    """[work(k) for k < n], each call in its own thread, all at once; fails on any thread's exception."""
    results, errors = [None] * n, []

    def run(k):
        try:
            results[k] = work(k)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


# ----------------------------------------------------------------------------- streaming objects hold the cache
def _stream_pieces(stream, whole: torch.Tensor, sizes: list) -> tuple:
    """Push ``whole`` in pieces of ``sizes`` (cycled), then flush: (concatenated output, cached bytes seen
    after each push)."""
    outs, cached, start, k = [], [], 0, 0
    while start < whole.shape[-1]:
        size = sizes[k % len(sizes)]
        outs.append(stream.push(whole[..., start : start + size]))
        cached.append(C.buffer_cache_bytes())
        start, k = start + size, k + 1
    outs.append(stream.flush())
    return torch.cat(outs, dim=-1), cached




def test_streams_keep_buffers_across_pushes_and_free_them_at_flush(monkeypatch):
    hf, ours = model_pair("16khz", seed=6)
    x = torch.from_numpy(synth_audio(16000 + 4321, 16000, seed=8))[None, None]
    with torch.inference_mode():
        codes = hf.encode(x).audio_codes
        reference = hf.decode(audio_codes=codes).audio_values
    decoder = ours.streaming_decoder()
    audio, cached = _stream_pieces(decoder, codes, [3, 7, 1, 5])
    # every push after the first finds the previous pushes' freed buffers kept (a scope per push would
    # leave nothing cached between pushes), and flush frees them
    assert all(c > 0 for c in cached), cached
    assert not decoder._buffers.held and C.buffer_cache_bytes() == 0
    encoder = ours.streaming_encoder()
    got_codes, cached = _stream_pieces(encoder, x, [1000, 2311, 517])
    assert all(c > 0 for c in cached), cached
    assert not encoder._buffers.held and C.buffer_cache_bytes() == 0
    # the outputs do not depend on the cache
    monkeypatch.setenv("DAC_FAST_CPU_CACHE_MB", "0")
    audio_off, cached = _stream_pieces(ours.streaming_decoder(), codes, [3, 7, 1, 5])
    codes_off, _ = _stream_pieces(ours.streaming_encoder(), x, [1000, 2311, 517])
    assert cached == [0] * len(cached)
    assert torch.equal(audio, audio_off)
    assert torch.equal(got_codes, codes_off)
    assert torch.equal(got_codes, codes)
    assert (audio - reference[..., : audio.shape[-1]]).abs().max() <= 1e-5


def test_reset_close_and_garbage_collection_free_a_streams_buffers():
    _, ours = model_pair("16khz", seed=7)
    codes = torch.randint(0, ours.config.codebook_size, (2, ours.config.n_codebooks, 9))
    for end in ("reset", "close", "collect"):
        decoder = ours.streaming_decoder(batch_size=2)
        decoder.push(codes[..., :4])
        assert decoder._buffers.held and C.buffer_cache_bytes() > 0
        if end == "reset":
            decoder.reset()
        elif end == "close":
            decoder.close()
        else:
            del decoder
            gc.collect()
        assert C.buffer_cache_bytes() == 0, end
    # close() keeps the streams: a later push goes on and holds the buffers again
    decoder = ours.streaming_decoder(batch_size=2)
    first = decoder.push(codes[..., :4])
    decoder.close()
    rest = torch.cat([decoder.push(codes[..., 4:]), decoder.flush()], dim=-1)
    whole = ours.decode(audio_codes=codes).audio_values
    assert (torch.cat([first, rest], dim=-1) - whole).abs().max() <= 1e-5
    assert C.buffer_cache_bytes() == 0


def test_slots_hold_buffers_while_any_slot_streams():
    from dac_fast.slots import SlotDecoder

    _, ours = model_pair("16khz", seed=9)
    codes = [torch.randint(0, ours.config.codebook_size, (ours.config.n_codebooks, n)) for n in (5, 8)]
    slots = SlotDecoder(ours, 3)
    out = [[piece] for piece in slots.push([codes[0][:, :2], codes[1][:, :3], None])[:2]]
    out[0].append(slots.push([codes[0][:, 2:], None, None])[0])
    assert C.buffer_cache_bytes() > 0
    out[0].append(slots.flush([0])[0])
    assert slots._buffers.held  # slot 1 still streams
    out[1] += [slots.push([None, codes[1][:, 3:], None])[1], slots.flush([1])[1]]
    assert not slots._buffers.held and C.buffer_cache_bytes() == 0
    for pieces, c in zip(out, codes):
        whole = ours.decode(audio_codes=c[None]).audio_values[0]
        assert (torch.cat(pieces) - whole).abs().max() <= 1e-5


def test_streams_in_threads_share_the_cache_safely():
    _, ours = model_pair("16khz", seed=10)
    xs = [torch.from_numpy(synth_audio(9000 + 997 * k, 16000, seed=20 + k))[None, None] for k in range(3)]
    with torch.inference_mode():
        expected = [ours.encode(x).audio_codes for x in xs]

    def work(k):
        return _stream_pieces(ours.streaming_encoder(), xs[k], [700 + 13 * k, 1500])[0]

    for got, want in zip(in_threads(work, len(xs)), expected):
        assert torch.equal(got, want)
    assert C.buffer_cache_bytes() == 0
