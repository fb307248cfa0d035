"""The CPU buffer cache (csrc/cpu/buffer_cache.cpp, dac_fast.ops.cpu_buffer_cache): reuse, scope, bounds,
threads, and identical model outputs with it on and off."""

import threading

import pytest
import torch

from dac_fast import ops

from tests.reference import model_pair, synth_audio

C = ops._C
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "buffer_cache_enter"), reason="extension not built")

MB = 1 << 20


def test_freed_buffers_are_reused_inside_the_scope_only():
    x = torch.empty(0)
    with ops.cpu_buffer_cache(x):
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
    with ops.cpu_buffer_cache(torch.empty(0)):
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
    with ops.cpu_buffer_cache(x):
        with ops.cpu_buffer_cache(x):
            a = torch.empty(MB)
            del a
        assert C.buffer_cache_bytes() >= 4 * MB  # inner exit keeps the cache
        a = torch.empty(MB)
        del a
    assert C.buffer_cache_bytes() == 0


def test_cache_is_bounded_by_the_peak_in_use(monkeypatch):
    monkeypatch.setenv("DAC_FAST_CPU_CACHE_MB", "1")
    # the floor is read once per process by the C++ side; the bound that matters here is the peak in use
    with ops.cpu_buffer_cache(torch.empty(0)):
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
    with ops.cpu_buffer_cache(torch.empty(0)):
        a = torch.empty(MB)
        del a
        assert C.buffer_cache_bytes() == 0
    monkeypatch.delenv("DAC_FAST_CPU_CACHE_MB")
    with ops.cpu_buffer_cache(torch.empty(0, device="meta")):
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
    results = [None] * len(xs)
    errors = []

    def work(k):
        try:
            with torch.inference_mode():
                for _ in range(2):
                    results[k] = ours.encode(xs[k], tile_frames=30).audio_codes
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert torch.equal(got, want)
    assert C.buffer_cache_bytes() == 0
