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
