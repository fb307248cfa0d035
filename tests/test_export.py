"""Export and compilation: torch.export / torch.jit.trace / ONNX through the pure-torch backend (a graph free of
dac_fast operators), torch.export keeping the fused operators otherwise, torch.compile without warnings."""

import warnings

import pytest
import torch

from dac_fast import DacConfig, DacModel, ops
from dac_fast.loading import randomize_
from tests.reference import synth_audio

SMALL = DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 5], decoder_hidden_size=16, n_codebooks=2)
needs_extension = pytest.mark.skipif("cpu" not in ops._KERNEL_DEVICES, reason="dac_fast._C has no CPU kernels")


class Encode(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_values):
        return self.model.encode(input_values).audio_codes


class Decode(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, audio_codes):
        return self.model.decode(audio_codes=audio_codes).audio_values


@pytest.fixture(scope="module")
def model():
    return randomize_(DacModel(SMALL), seed=2).eval()


@pytest.fixture(scope="module")
def audio():
    return torch.from_numpy(synth_audio(10 * 23 + 9, 16000, seed=7))[None, None]


def _dac_fast_targets(exported) -> set:
    return {str(n.target) for n in exported.graph.nodes if n.op == "call_function" and "dac_fast" in str(n.target)}


def test_torch_export_under_the_torch_backend(model, audio):
    """Under ops.backend("torch") the exported graphs hold only aten operators (portable, and what ONNX export
    needs) and compute what eager does."""
    with torch.no_grad(), ops.backend("torch"):
        codes = model.encode(audio).audio_codes
        decoded = model.decode(audio_codes=codes).audio_values
        encoder = torch.export.export(Encode(model), (audio,))
        decoder = torch.export.export(Decode(model), (codes,))
    assert _dac_fast_targets(encoder) == set() and _dac_fast_targets(decoder) == set()
    with torch.no_grad():
        assert torch.equal(encoder.module()(audio), codes)
        assert torch.equal(decoder.module()(codes), decoded)


@needs_extension
def test_torch_export_keeps_the_fused_operators(model, audio):
    """By default the fused operators stay in the graph (they have fake kernels): the program runs where
    dac_fast._C is loaded, with the eager codes."""
    with torch.no_grad():
        codes = model.encode(audio).audio_codes
        encoder = torch.export.export(Encode(model), (audio,))
        decoder = torch.export.export(Decode(model), (codes,))
        assert "dac_fast.rvq_encode.default" in _dac_fast_targets(encoder)
        assert "dac_fast.add_snake.default" in _dac_fast_targets(decoder)
        assert torch.equal(encoder.module()(audio), codes)
        assert torch.allclose(decoder.module()(codes), model.decode(audio_codes=codes).audio_values, atol=1e-6)


def test_jit_trace_under_the_torch_backend(model, audio):
    with torch.no_grad(), ops.backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, and warns about the traced shapes
        codes = model.encode(audio).audio_codes
        traced_encoder = torch.jit.trace(Encode(model), (audio,), check_trace=False)
        traced_decoder = torch.jit.trace(Decode(model), (codes,), check_trace=False)
        decoded = model.decode(audio_codes=codes).audio_values
    for traced in (traced_encoder, traced_decoder):
        kinds = {node.kind() for node in traced.inlined_graph.nodes()}
        assert not any(kind.startswith("dac_fast::") for kind in kinds), kinds
    with torch.no_grad():
        assert torch.equal(traced_encoder(audio), codes)
        assert torch.equal(traced_decoder(codes), decoded)


def test_onnx_export_under_the_torch_backend(model, audio, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    with torch.no_grad(), ops.backend("torch"):
        codes = model.encode(audio).audio_codes
        torch.onnx.export(Decode(model).eval(), (codes,), tmp_path / "decoder.onnx", dynamo=True)
    graph = onnx.load(tmp_path / "decoder.onnx")
    onnx.checker.check_model(graph)
    assert not any(node.domain.startswith("dac_fast") for node in graph.graph.node)


@needs_extension
def test_torch_compile_traces_through_the_buffer_cache_scope(model, audio):
    """The CPU buffer cache swaps torch's allocator around a tiled call; while Dynamo traces, the scope is a
    no-op (no graph break, no warning about an untraceable builtin); the compiled calls give the eager audio
    to rounding."""
    torch._dynamo.reset()
    with torch.no_grad():
        codes = model.encode(audio).audio_codes
        decoded = model.decode(audio_codes=codes).audio_values
        decode = torch.compile(model.decode, backend="eager")  # Dynamo's part: the backend does not matter
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # traced graphs hold F.conv1d where eager CPU fp32 calls oneDNN directly: equal to rounding
            torch.testing.assert_close(decode(audio_codes=codes).audio_values, decoded, rtol=0, atol=1e-5)
    assert [str(w.message) for w in caught if "Dynamo" in str(w.message)] == []
    breaks = " ".join(torch._dynamo.utils.counters["graph_break"])
    assert "buffer_cache" not in breaks and "does not know how to trace" not in breaks
