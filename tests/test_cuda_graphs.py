"""``cuda_graphs=True`` in DacModel.encode/decode, and the host synchronisations of encode/decode on CUDA.

On the CPU: the clear errors, and the graph cache's bookkeeping with a recorder that replays eagerly (captures
counted: a long tiled call replays instead of re-capturing; the key follows the kernel settings). On CUDA
(skipped without a GPU; scripts/gpu_check.sh runs the tests whose names contain `model_cuda` first in its
model_parity step): graphs agree with the eager path within scripts/cuda_agreement.py's bounds (that step
reports the measured agreement) for several tile shapes, padded batches and after weight updates, and
encode/decode wait for the GPU once for their input checks (decode from codes too: the rvq_decode op reads
nothing back on CUDA).
"""

import copy
import importlib.util
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from dac_fast import DacConfig, DacModel
from dac_fast.configuration import PRESETS
from dac_fast.cuda_graphs import MODEL_GRAPHS, GraphCache, kernel_settings
from tests.reference import synth_audio


def _load_agreement():
    """scripts/cuda_agreement.py by its path (scripts/ is no package; an installed one could shadow the name)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "cuda_agreement.py"
    spec = importlib.util.spec_from_file_location("dac_fast_cuda_agreement", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_agreement = _load_agreement()
measure, verdict = _agreement.measure, _agreement.verdict

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _audio(batch, n_samples, device="cpu", seed=0):
    clips = [torch.from_numpy(synth_audio(n_samples, 16000, seed=seed + b)).float() for b in range(batch)]
    return torch.stack(clips).view(batch, 1, -1).to(device)


@pytest.fixture(scope="module")
def cpu_model():
    return DacModel.from_preset("16khz", seed=0)


# ----------------------------------------------------------------------------- errors (CPU)
def test_cuda_graphs_errors_on_cpu(cpu_model):
    x = _audio(1, 960)
    with torch.inference_mode():
        codes = cpu_model.encode(x).audio_codes
        with pytest.raises(ValueError, match=r"cuda_graphs=True needs the model and its inputs on a CUDA device, got cpu"):
            cpu_model.encode(x, cuda_graphs=True)
        with pytest.raises(ValueError, match=r"cuda_graphs=True needs .* CUDA device"):
            cpu_model.decode(audio_codes=codes, cuda_graphs=True)
        with pytest.raises(ValueError, match=r"cuda_graphs must be True or False, got 'yes'"):
            cpu_model.encode(x, cuda_graphs="yes")
        assert torch.equal(cpu_model.encode(x, cuda_graphs=False).audio_codes, codes)


def test_cuda_graphs_errors_outside_inference(cpu_model):
    x = _audio(1, 960)
    # autograd would need the graph: parameters require grad and grad mode is on
    with pytest.raises(ValueError, match=r"cuda_graphs=True runs inference only"):
        cpu_model.encode(x, cuda_graphs=True)
    cpu_model.train()
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r"cuda_graphs=True runs inference only.*model.eval\(\)"):
            cpu_model.decode(torch.zeros(1, 1024, 3), cuda_graphs=True)
    finally:
        cpu_model.eval()


# ----------------------------------------------------------------------------- graph cache (CPU, eager recorder)
@pytest.fixture(scope="module")
def narrow_model():
    """The 16khz layout (its tile plans and halos) with narrow layers: fast on the CPU."""
    config = DacConfig(**dict(PRESETS["16khz"], encoder_hidden_size=8, decoder_hidden_size=32))
    return DacModel(config).eval()


def test_graph_cache_replays_a_long_tiled_call(narrow_model):
    """A tiled call runs several tile shapes in the encoder and in the decoder (4 + 4 here, more than the old
    fixed cache of 4 graphs): the cache grows to what one call needs, so a second encode and decode replay
    every tile instead of re-capturing. The recorder replays eagerly through the same bookkeeping, so the
    outputs must equal the plain eager call's exactly."""
    cache = GraphCache(capture=lambda run: run)
    settings = kernel_settings()
    x = _audio(1, 320 * 40 + 13, seed=9)
    tile = 12
    with torch.inference_mode():
        ref_latent = narrow_model._encode_latent(x, tile)
        ref_audio = narrow_model._decode_latent(ref_latent, tile)
        for attempt in range(2):  # capture, then replay
            latent = narrow_model._encode_latent(x, tile, graphs=cache.wrapper("encoder", settings))
            audio = narrow_model._decode_latent(latent, tile, graphs=cache.wrapper("decoder", settings))
            _assert_equal(latent, ref_latent, f"latent (call {attempt})")
            _assert_equal(audio, ref_audio, f"audio (call {attempt})")
            if attempt == 0:
                first = cache.captures
                assert cache.capacity == {"encoder": 4, "decoder": 4}, cache.capacity
                assert first == len(cache.calls) == 8, "one capture per tile shape"
        assert cache.captures == first, f"{cache.captures - first} re-captures in the repeated calls"
        # another input's plan replaces the least recently used graphs: the cache never outgrows one call's need
        narrow_model._encode_latent(x[..., : 320 * 30], tile, graphs=cache.wrapper("encoder", settings))
        assert sum(1 for key in cache.calls if key[0] == "encoder") == cache.capacity["encoder"] == 4


def test_graph_cache_key_follows_kernel_settings(narrow_model):
    """A call under other kernel settings (deterministic mode, cuDNN flags, autocast) records its own graph."""
    cache = GraphCache(capture=lambda run: run)
    x = _audio(1, 320 * 6 + 7)
    keys = set()
    with torch.inference_mode():
        for deterministic in (False, True):
            old = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                narrow_model._encode_latent(x, 4, graphs=cache.wrapper("encoder", kernel_settings()))
                keys.add(kernel_settings())
            finally:
                torch.use_deterministic_algorithms(old)
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False):
            keys.add(kernel_settings())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            if torch.cuda.is_available():
                keys.add(kernel_settings())
    assert len(keys) == (4 if torch.cuda.is_available() else 3), keys
    assert cache.captures == 2, "one capture per setting: deterministic mode is in the key"


# ----------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def gpu_model():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return DacModel.from_preset("16khz", seed=0, device="cuda")


def _graph_cache(model) -> GraphCache | None:
    entry = MODEL_GRAPHS.get(model, {}).get("graphs")  # a derived_from entry: (key, sources, GraphCache)
    return None if entry is None else entry[2]


def _assert_equal(actual, expected, what):
    """Exact: the CPU's eager recorder replays the very calls."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{what}: graphs differ from eager (max abs difference {diff:.3g})")


def _assert_agrees(actual, expected, what):
    """On CUDA: within the device check's agreement bounds (a capture may run other cuDNN algorithms than the
    eager call; scripts/cuda_agreement.py measures how close they are)."""
    problem = verdict(measure(actual, expected))
    assert problem is None, f"{what}: {problem}"


def test_agreement_verdict():
    codes = torch.randint(0, 1024, (2, 12, 500), generator=torch.Generator().manual_seed(0))
    audio = torch.rand(2, 1000) * 2 - 1
    assert verdict(measure(codes, codes.clone())) is None and verdict(measure(audio, audio + 5e-4)) is None
    one_off = codes.clone()
    one_off[0, 0, 0] += 1  # 1 in 12000 differ: 99.99% agree
    assert verdict(measure(one_off, codes)) is None
    one_off[1, :, :3] += 1  # 37 in 12000: below 99.9%
    assert "codes agree on 99.69" in verdict(measure(one_off, codes))
    assert "audio differs by 0.002" in verdict(measure(audio + 2e-3, audio))
    assert "shape (2, 999)" in verdict(measure(audio[:, 1:], audio))
    nan = audio.clone()
    nan[1, 7] = float("nan")
    assert "NaN" in verdict(measure(nan, audio))


@cuda
def test_model_cuda_graphs_equal_eager(gpu_model):
    """Two batch shapes, untiled and tiled (time tiles of several shapes), encode then decode, each twice so
    the second call replays."""
    MODEL_GRAPHS.pop(gpu_model, None)
    with torch.inference_mode():
        for batch, n_samples, tile in [(3, 16000 + 77, None), (2, 9600 + 5, 12)]:
            x = _audio(batch, n_samples, "cuda", seed=batch)
            ref = gpu_model.encode(x, tile_frames=tile)
            ref_audio = gpu_model.decode(ref.quantized_representation, tile_frames=tile).audio_values
            ref_from_codes = gpu_model.decode(audio_codes=ref.audio_codes, tile_frames=tile).audio_values
            for attempt in ("capture", "replay"):
                out = gpu_model.encode(x, tile_frames=tile, cuda_graphs=True)
                _assert_agrees(out.audio_codes, ref.audio_codes, f"codes ({attempt}, batch {batch})")
                _assert_agrees(out.quantized_representation, ref.quantized_representation, f"quantized ({attempt})")
                audio = gpu_model.decode(ref.quantized_representation, tile_frames=tile, cuda_graphs=True).audio_values
                _assert_agrees(audio, ref_audio, f"decode ({attempt}, batch {batch})")
                audio = gpu_model.decode(audio_codes=ref.audio_codes, tile_frames=tile, cuda_graphs=True).audio_values
                _assert_agrees(audio, ref_from_codes, f"decode(codes) ({attempt}, batch {batch})")
                cache = _graph_cache(gpu_model)
                if attempt == "capture":
                    captured = cache.captures
                assert cache.captures == captured >= 1, f"{attempt}: every tile shape captured once, then replayed"


@cuda
def test_model_cuda_graphs_padded_batch(gpu_model):
    x = _audio(3, 8000 + 31, "cuda", seed=7)
    mask = torch.ones(3, x.shape[-1], dtype=torch.long, device="cuda")
    mask[1, 5000:] = 0
    mask[2, 2001:] = 0
    with torch.inference_mode():
        ref = gpu_model.encode(x, padding_mask=mask)
        ref_audio = gpu_model.decode(audio_codes=ref.audio_codes, audio_frames=ref.audio_frames).audio_values
        for _ in range(2):
            out = gpu_model.encode(x, padding_mask=mask, cuda_graphs=True)
            _assert_agrees(out.audio_codes, ref.audio_codes, "padded codes")
            audio = gpu_model.decode(audio_codes=out.audio_codes, audio_frames=out.audio_frames, cuda_graphs=True)
            _assert_agrees(audio.audio_values, ref_audio, "padded decode")


@cuda
def test_model_cuda_graphs_follow_weight_updates():
    model = DacModel.from_preset("16khz", seed=1, device="cuda")
    x = _audio(2, 4800 + 3, "cuda", seed=3)
    with torch.inference_mode():
        before = model.encode(x, cuda_graphs=True)
        model.encode(x, cuda_graphs=True)
        audio_before = model.decode(before.quantized_representation, cuda_graphs=True).audio_values
    with torch.no_grad():  # in place: same storage, new version
        model.encoder.conv1.weight.mul_(-1.5)
        model.decoder.conv2.weight.mul_(0.5)
        model.quantizer.quantizers[0].codebook.weight.neg_()
    with torch.inference_mode():
        out = model.encode(x, cuda_graphs=True)
        _assert_agrees(out.audio_codes, model.encode(x).audio_codes, "codes after mul_")
        assert not torch.equal(out.audio_codes, before.audio_codes)
        audio = model.decode(before.quantized_representation, cuda_graphs=True).audio_values
        _assert_agrees(audio, model.decode(before.quantized_representation).audio_values, "decode after mul_")
        assert not torch.equal(audio, audio_before)
    model.load_state_dict(DacModel.from_preset("16khz", seed=2).state_dict())
    with torch.inference_mode():
        _assert_agrees(model.encode(x, cuda_graphs=True).audio_codes, model.encode(x).audio_codes,
                      "codes after load_state_dict")
    model.half()
    with torch.inference_mode():
        _assert_agrees(model.encode(x.half(), cuda_graphs=True).audio_codes, model.encode(x.half()).audio_codes,
                      "codes after half()")
    # the graphs live beside the model: it still deep-copies and pickles, and a copy captures its own
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.inference_mode():
            _assert_agrees(clone.encode(x.half(), cuda_graphs=True).audio_codes, model.encode(x.half()).audio_codes,
                          "codes of a copy")


def _synchronisations(fn):
    """Host synchronisations of ``fn()`` on the current CUDA device, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


@cuda
def test_model_cuda_host_synchronisations(gpu_model):
    x = _audio(2, 16000 + 77, "cuda", seed=5)
    mask = torch.ones(2, x.shape[-1], dtype=torch.long, device="cuda")
    mask[1, 9000:] = 0
    n = torch.tensor(6, device="cuda")
    with torch.inference_mode():
        out = gpu_model.encode(x, padding_mask=mask)
        for graphs in (False, True):
            gpu_model.encode(x, cuda_graphs=graphs)  # a graph captures here (capturing synchronises)
            gpu_model.decode(out.quantized_representation, cuda_graphs=graphs)
            counts = {
                "encode": _synchronisations(lambda: gpu_model.encode(x, cuda_graphs=graphs)),
                "encode(n_quantizers tensor, padding_mask)": _synchronisations(
                    lambda: gpu_model.encode(x, n_quantizers=n, padding_mask=mask)),
                "decode(latent)": _synchronisations(
                    lambda: gpu_model.decode(out.quantized_representation, cuda_graphs=graphs)),
                "decode(codes, audio_frames)": _synchronisations(
                    lambda: gpu_model.decode(audio_codes=out.audio_codes, audio_frames=out.audio_frames,
                                             cuda_graphs=graphs)),
            }
            for what, syncs in counts.items():
                assert len(syncs) <= 1, f"{what} (cuda_graphs={graphs}) synchronised {len(syncs)} times: {syncs}"


# ----------------------------------------------------------------------------- streaming decoder
def _stream(dec, codes, sizes, reset_after=None):
    """Every push's output (and the flush's); ``reset_after`` (push index, mask): a partial reset there."""
    outs, start = [], 0
    for i, size in enumerate(sizes):
        outs.append(dec.push(codes[..., start : start + size]))
        start += size
        if reset_after is not None and i == reset_after[0]:
            dec.reset(reset_after[1])
    outs.append(dec.flush())
    return outs


def test_streaming_decoder_cuda_graphs_error_on_cpu(cpu_model):
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs the model on a CUDA device, got cpu"):
        cpu_model.streaming_decoder(2, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"cuda_graphs must be True or False, got 1"):
        cpu_model.streaming_decoder(2, cuda_graphs=1)


@pytest.mark.parametrize("reset", [False, True])
def test_streaming_step_bookkeeping_replayed_eagerly(cpu_model, reset):
    """The recorded-step bookkeeping (static buffers, context copied back, positions advanced) on the CPU, with
    a recorder that replays eagerly instead of a CUDA graph: every push equals the plain stream's exactly,
    also across a partial reset (pushes after it run eagerly from the state the replays left)."""
    from dac_fast.cuda_graphs import StepGraphs

    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 1024, (2, 12, 40), generator=gen)
    sizes = [3] + [4] * 8 + [5]
    reset_after = (6, torch.tensor([False, True])) if reset else None
    expected = _stream(cpu_model.streaming_decoder(2), codes, sizes, reset_after)
    dec = cpu_model.streaming_decoder(2)
    recorded = []
    dec._graphs = StepGraphs(lambda run: recorded.append(run) or run)
    outs = _stream(dec, codes, sizes, reset_after)
    assert len(recorded) == 1 and len(dec._graphs.steps) == 1, "steady 4-frame pushes should be recorded once"
    for i, (out, ref) in enumerate(zip(outs, expected)):
        _assert_equal(out, ref, f"push {i}")


@cuda
def test_model_cuda_streaming_decoder_graphs_equal_eager(gpu_model):
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 1024, (3, 12, 46), generator=gen).cuda()
    sizes = [5] + [4] * 9 + [2, 3]
    expected = _stream(gpu_model.streaming_decoder(3), codes, sizes)
    dec = gpu_model.streaming_decoder(3, cuda_graphs=True)
    outs = _stream(dec, codes, sizes)
    assert len(dec._graphs.steps) == 1, "the steady 4-frame pushes should replay one captured step"
    for i, (out, ref) in enumerate(zip(outs, expected)):
        _assert_agrees(out, ref, f"push {i}")
    dec.reset()  # a second request through the same decoder replays the same graph
    again = _stream(dec, codes, sizes)
    for i, (out, ref) in enumerate(zip(again, expected)):
        _assert_agrees(out, ref, f"second request, push {i}")
