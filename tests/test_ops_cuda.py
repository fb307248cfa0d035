"""The tests of tests/test_ops.py, run on CUDA (the `device` fixture is overridden), plus CUDA-only
checks: the 64-bit indexing test by default, and a device-to-device consistency check of the CPU
and CUDA kernels. Skipped without a GPU or without CUDA kernels in dac_fast._C.

On CUDA the Snake kernels are compared with the eager reference with a tolerance (sinf vs torch's
sin can differ by an ulp); rvq_encode exact codes must still be identical to transformers (TF32
off: tests/conftest.py turns it off for every test), because the kernels run the same cuBLAS/cuDNN calls
for everything but the fused argmax.

The model tests (names containing `model_cuda`) run DacModel and transformers' DacModel side by side on the
GPU; scripts/gpu_check.sh runs them as their own step.
"""

from __future__ import annotations

import pytest
import torch

from dac_fast import ops
from tests.test_ops import *  # noqa: F401,F403  (every test, re-collected here with device="cuda")
from tests.test_ops import _alpha, _x, check_int64_indexing

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not ops._extension_available("cuda"), reason="dac_fast._C has no CUDA kernels"),
]


@pytest.fixture
def device():
    return "cuda"


def test_snake_int64_indexing_cuda():
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GB of free GPU memory")
    check_int64_indexing("cuda")
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_kernels(dtype):
    x = _x((3, 5, 4099), "cpu", dtype)
    a = _alpha(5, "cpu")
    cpu = torch.ops.dac_fast.snake(x, a)
    gpu = torch.ops.dac_fast.snake(x.cuda(), a.cuda()).cpu()
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(gpu.float(), cpu.float(), rtol=tol, atol=tol * 4)


def test_cuda_snake_backward_grad_alpha_large():
    # many blocks per channel accumulate grad_alpha atomically
    x = _x((4, 3, 300001), "cuda", scale=1.0)
    a = _alpha(3, "cuda").requires_grad_()
    g = _x((4, 3, 300001), "cuda", seed=3)
    xr = x.double().requires_grad_()
    ar = a.detach().double().requires_grad_()
    ops.snake_reference(xr, ar).backward(g.double())
    x1 = x.clone().requires_grad_()
    ops.snake(x1, a).backward(g)
    torch.testing.assert_close(x1.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.grad.double(), ar.grad, rtol=1e-4, atol=1e-2)


def test_cuda_rvq_real_shape_codes():
    from tests.test_ops import _make_transformers_rvq, _weights_of

    q = _make_transformers_rvq(11, 1024, 9, "cuda")
    w = _weights_of(q)
    z = _x((16, 1024, 862), "cuda", seed=1, scale=1.0)
    with torch.no_grad():
        ref_q, ref_codes, ref_lat, _, _ = q(z, n_quantizers=9)
        codes, quant, lat = ops.rvq_encode(z, *w, 9, mode="exact")
        fc, _, _ = ops.rvq_encode(z, *w, 9, mode="fast")
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(quant, ref_q, rtol=1e-5, atol=1e-5)
    agreement = (fc == codes).float().mean().item()
    print(f"CUDA fast-mode agreement at (16, 1024, 862) x 9: {agreement:.6f}")
    assert agreement >= 0.98


def test_cuda_snake_backward_alerts_under_deterministic_algorithms():
    # grad_alpha is accumulated with atomicAdd: not bit-reproducible, so torch's deterministic mode is told
    x = _x((2, 3, 1001), "cuda").requires_grad_()
    a = _alpha(3, "cuda").requires_grad_()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="snake_backward.*deterministic"):
            ops.snake(x, a).sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="snake_backward"):
            ops.snake(x, a).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------- the model on the GPU
@pytest.mark.parametrize("preset", ["16khz", "24khz", "44khz"])
def test_model_cuda_matches_transformers_on_cuda(preset):
    """Both models on the GPU in fp32 (TF32 off, conftest): identical codes, decoded audio within tolerance."""
    from tests.reference import model_pair
    from tests.test_model import assert_close, batch_of_two

    hf, ours = model_pair(preset, seed=11)
    hf, ours = hf.cuda(), ours.cuda()
    x = batch_of_two(ours.config).cuda()
    with torch.inference_mode():
        ref = hf.encode(x)
        out = ours.encode(x)
        assert out.audio_codes.is_cuda
        assert torch.equal(out.audio_codes, ref.audio_codes), (
            f"{(out.audio_codes != ref.audio_codes).float().mean().item():.6f} of the codes differ")
        assert len(torch.unique(out.audio_codes)) > 50, "codes should be diverse on this audio"
        assert_close(out.quantized_representation, ref.quantized_representation, rtol=1e-4, what="quantized")
        audio = ours.decode(out.quantized_representation).audio_values
        assert_close(audio, hf.decode(ref.quantized_representation).audio_values, rtol=1e-4, what="decode")
        audio = ours.decode(audio_codes=out.audio_codes).audio_values
        assert_close(audio, hf.decode(audio_codes=ref.audio_codes).audio_values, rtol=1e-4, what="decode(codes)")
