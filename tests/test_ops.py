"""dac_fast._C operators against their pure-torch references (CPU; tests/test_ops_cuda.py runs the
same tests on CUDA by overriding the `device` fixture).

What is checked, per op: random shapes (odd T, T = 1, T > 65536), every dtype the kernels claim,
non-contiguous inputs, poisoned outputs (DAC_FAST_POISON=1: outputs pre-filled with NaN / -1 must be
fully overwritten), torch.library.opcheck, gradcheck in float64 (the kernels take float64, with
math in float64, precisely so gradcheck runs on the real kernels), rvq_encode exact codes and
outputs identical to transformers' DacResidualVectorQuantizer, the fast mode's code agreement
above a stated floor, rvq_decode against transformers' from_codes.

Skipped when the extension is not built (`python setup.py build_ext --inplace`).
"""

from __future__ import annotations

import os

import pytest
import torch

from dac_fast import ops

FAST_AGREEMENT_FLOOR = 0.98  # fast-mode code agreement with exact mode, asserted on random data

pytestmark = pytest.mark.skipif(not ops._extension_available("cpu"), reason="dac_fast._C is not built")

SNAKE_SHAPES = [(1, 1, 1), (2, 3, 1), (2, 5, 17), (1, 3, 33), (3, 4, 8193), (1, 2, 70001)]
HALF_TYPES = [torch.float16, torch.bfloat16]


@pytest.fixture
def device():
    return "cpu"


def _exact(device) -> bool:
    """CPU kernels reproduce eager fp32 torch bit for bit; CUDA is compared with a tolerance."""
    return device == "cpu"


def _alpha(c, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, c, 1, generator=g) * 2 + 0.05).to(device=device, dtype=dtype)


def _x(shape, device, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _assert_close(out, ref, device, dtype=torch.float32):
    if _exact(device) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(out, ref), f"max abs diff {(out.double() - ref.double()).abs().max().item()}"
    else:
        tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * 4)


# ------------------------------------------------------------------------------------------ snake
@pytest.mark.parametrize("shape", SNAKE_SHAPES)
def test_snake_fp32_matches_eager(shape, device):
    x, a = _x(shape, device), _alpha(shape[1], device)
    out = torch.ops.dac_fast.snake(x, a)
    assert out.shape == x.shape and out.dtype == x.dtype
    _assert_close(out, ops.snake_reference(x, a), device)


@pytest.mark.parametrize("dtype", HALF_TYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 5, 257), (1, 2, 70001)])
def test_snake_dtypes(shape, dtype, device):
    x, a = _x(shape, device, dtype), _alpha(shape[1], device)
    out = torch.ops.dac_fast.snake(x, a)
    assert out.dtype == dtype
    if dtype == torch.float64:
        ref = ops.snake_reference(x, a.double())
    else:  # math in fp32, rounded once
        ref = ops.snake_reference(x.float(), a).to(dtype)
    _assert_close(out, ref, device, dtype)


def test_snake_alpha_in_low_precision(device):
    x = _x((2, 6, 99), device, torch.bfloat16)
    a = _alpha(6, device, torch.bfloat16)
    out = torch.ops.dac_fast.snake(x, a)
    _assert_close(out, ops.snake_reference(x.float(), a.float()).to(torch.bfloat16), device, torch.bfloat16)


def test_snake_noncontiguous(device):
    base = _x((3, 8, 401), device)
    x = base[:, ::2, 1::3]  # strided in C and T
    a = _alpha(4, device)
    _assert_close(torch.ops.dac_fast.snake(x, a), ops.snake_reference(x.contiguous(), a), device)
    xt = _x((2, 50, 6), device).transpose(1, 2)  # (2, 6, 50), channels-last-like
    a6 = _alpha(6, device).reshape(6)  # (C,) alpha accepted too
    _assert_close(torch.ops.dac_fast.snake(xt, a6), ops.snake_reference(xt.contiguous(), a6), device)


def test_snake_empty(device):
    x = torch.empty(2, 3, 0, device=device)
    assert torch.ops.dac_fast.snake(x, _alpha(3, device)).shape == (2, 3, 0)


def test_snake_bad_inputs(device):
    with pytest.raises(RuntimeError, match="must have shape \\(B, C, T\\)"):
        torch.ops.dac_fast.snake(torch.zeros(3, 4, device=device), _alpha(3, device))
    with pytest.raises(RuntimeError, match="alpha must have C = 4 elements"):
        torch.ops.dac_fast.snake(torch.zeros(1, 4, 5, device=device), _alpha(3, device))
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        torch.ops.dac_fast.snake(torch.zeros(1, 3, 5, dtype=torch.int32, device=device), _alpha(3, device))


def test_poisoned_outputs_fully_written(device, monkeypatch):
    monkeypatch.setenv("DAC_FAST_POISON", "1")
    for shape in [(1, 1, 1), (2, 3, 17), (1, 2, 70001)]:
        x, a = _x(shape, device), _alpha(shape[1], device)
        y = torch.ops.dac_fast.snake(x, a)
        assert not y.isnan().any()
        _assert_close(y, ops.snake_reference(x, a), device)
        s, y2 = torch.ops.dac_fast.add_snake(x, x * 0.5, a)
        assert not s.isnan().any() and not y2.isnan().any()
        sc, b = _x((shape[1],), device, seed=1).abs() + 0.5, _x((shape[1],), device, seed=2)
        y3 = torch.ops.dac_fast.scale_bias_snake(x, sc, b, a)
        assert not y3.isnan().any()
        g = _x(shape, device, seed=3)
        gx, ga = torch.ops.dac_fast.snake_backward(g, x, a)
        assert not gx.isnan().any() and not ga.isnan().any()
    # the switch really poisons: an empty-T output keeps no element, a plain empty allocation check
    assert os.environ["DAC_FAST_POISON"] == "1"


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_TYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 5, 17), (1, 2, 70001)])
def test_add_snake(shape, dtype, device):
    a, b = _x(shape, device, dtype, seed=1), _x(shape, device, dtype, seed=2)
    alpha = _alpha(shape[1], device)
    s, y = torch.ops.dac_fast.add_snake(a, b, alpha)
    s_ref = a + b
    assert torch.equal(s, s_ref)
    if dtype == torch.float64:
        ref = ops.snake_reference(s_ref, alpha.double())
    else:
        ref = ops.snake_reference(s_ref.float(), alpha).to(dtype)
    _assert_close(y, ref, device, dtype)
    # through the public wrapper (fp32 compares with the public reference path)
    if dtype == torch.float32:
        with ops.backend("torch"):
            s2, y2 = ops.add_snake(a, b, alpha)
        s3, y3 = ops.add_snake(a, b, alpha)
        assert torch.equal(s2, s3)
        _assert_close(y3, y2, device)


def test_add_snake_noncontiguous(device):
    a = _x((2, 40, 6), device).transpose(1, 2)
    b = _x((2, 6, 80), device, seed=5)[:, :, ::2]
    alpha = _alpha(6, device)
    s, y = torch.ops.dac_fast.add_snake(a, b, alpha)
    assert torch.equal(s, a + b)
    _assert_close(y, ops.snake_reference(a + b, alpha), device)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_TYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 5, 17), (1, 2, 70001)])
def test_scale_bias_snake(shape, dtype, device):
    y = _x(shape, device, dtype)
    c = shape[1]
    scale = _x((c,), device, seed=4).abs() + 0.25
    bias = _x((c,), device, seed=5)
    alpha = _alpha(c, device)
    out = torch.ops.dac_fast.scale_bias_snake(y, scale, bias, alpha)
    if dtype == torch.float64:
        ref = ops.snake_reference(y * scale.double().reshape(1, c, 1) + bias.double().reshape(1, c, 1), alpha.double())
    else:
        yf = y.float()
        ref = ops.snake_reference(yf * scale.reshape(1, c, 1) + bias.reshape(1, c, 1), alpha).to(dtype)
    _assert_close(out, ref, device, dtype)
    if dtype == torch.float32:
        with ops.backend("torch"):
            r2 = ops.scale_bias_snake(y, scale.reshape(1, c, 1), bias, alpha)
        _assert_close(ops.scale_bias_snake(y, scale.reshape(1, c, 1), bias, alpha), r2, device)


# -------------------------------------------------------------------------------------- backward
def test_snake_gradcheck_float64(device):
    x = _x((2, 3, 9), device, torch.float64, scale=1.5).requires_grad_()
    a = _alpha(3, device, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: torch.ops.dac_fast.snake(x, a), (x, a))


def test_add_snake_gradcheck_float64(device):
    a = _x((2, 3, 7), device, torch.float64, seed=1, scale=1.0).requires_grad_()
    b = _x((2, 3, 7), device, torch.float64, seed=2, scale=1.0).requires_grad_()
    al = _alpha(3, device, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, al: torch.ops.dac_fast.add_snake(a, b, al), (a, b, al))


def test_scale_bias_snake_gradcheck_float64(device):
    y = _x((2, 3, 7), device, torch.float64, scale=1.0).requires_grad_()
    scale = (_x((3,), device, torch.float64, seed=4).abs() + 0.5).requires_grad_()
    bias = _x((3,), device, torch.float64, seed=5).requires_grad_()
    al = _alpha(3, device, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.dac_fast.scale_bias_snake(*t), (y, scale, bias, al)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snake_backward_matches_autograd(dtype, device):
    x = _x((3, 4, 1001), device, dtype)
    a = _alpha(4, device)
    g = _x((3, 4, 1001), device, dtype, seed=9)
    xr, ar = x.float().clone().requires_grad_(), a.clone().requires_grad_()
    ops.snake_reference(xr, ar).backward(g.float())
    x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
    ops.snake(x1, a1).backward(g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x1.grad.float(), xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(a1.grad, ar.grad, rtol=1e-4, atol=1e-3 if dtype == torch.float32 else 0.5)


# --------------------------------------------------------------------------------------- opcheck
def _opcheck(op, args):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    torch.library.opcheck(op, args)


def test_opcheck_snake_family(device):
    x = _x((2, 3, 11), device).requires_grad_()
    a = _alpha(3, device).requires_grad_()
    _opcheck(torch.ops.dac_fast.snake.default, (x, a))
    b = _x((2, 3, 11), device, seed=3).requires_grad_()
    _opcheck(torch.ops.dac_fast.add_snake.default, (x, b, a))
    sc = (_x((3,), device, seed=4).abs() + 0.5).requires_grad_()
    bi = _x((3,), device, seed=5).requires_grad_()
    _opcheck(torch.ops.dac_fast.scale_bias_snake.default, (x, sc, bi, a))
    _opcheck(torch.ops.dac_fast.snake_backward.default, (_x((2, 3, 11), device, seed=6), x.detach(), a.detach()))


def test_opcheck_rvq(device):
    w = _rvq_weights(2, 64, device)
    z = _x((2, 64, 13), device, scale=1.0)
    normalized = torch.nn.functional.normalize(w[2], dim=-1)
    for exact in (True, False):
        _opcheck(torch.ops.dac_fast.rvq_encode.default, (z, *w, 2, exact))
        _opcheck(torch.ops.dac_fast.rvq_encode.default, (z, *w, 2, exact, normalized))
    codes = torch.randint(0, 1024, (2, 2, 13), device=device)
    _opcheck(torch.ops.dac_fast.rvq_decode.default, (codes, *w[2:]))


def test_snake_under_torch_compile(device):
    x, a = _x((2, 3, 50), device), _alpha(3, device)
    f = torch.compile(lambda x, a: ops.snake(x, a) * 2, backend="aot_eager", fullgraph=True)
    _assert_close(f(x, a), ops.snake_reference(x, a) * 2, device)


# ------------------------------------------------------------------------------------------- RVQ
def _make_transformers_rvq(seed, hidden, n_codebooks, device):
    transformers = pytest.importorskip("transformers")
    from transformers.models.dac.modeling_dac import DacResidualVectorQuantizer

    cfg = transformers.DacConfig(hidden_size=hidden, n_codebooks=n_codebooks, codebook_size=1024, codebook_dim=8)
    torch.manual_seed(seed)
    q = DacResidualVectorQuantizer(cfg).eval()
    with torch.no_grad():
        for name, p in q.named_parameters():
            if "proj.weight" in name:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn_like(p))
    return q.to(device)


def _weights_of(q):
    qs = q.quantizers
    return (
        torch.stack([m.in_proj.weight.squeeze(-1) for m in qs]).detach(),
        torch.stack([m.in_proj.bias for m in qs]).detach(),
        torch.stack([m.codebook.weight for m in qs]).detach(),
        torch.stack([m.out_proj.weight.squeeze(-1) for m in qs]).detach(),
        torch.stack([m.out_proj.bias for m in qs]).detach(),
    )


def _rvq_weights(n, hidden, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (
        torch.randn(n, 8, hidden, generator=g) / hidden**0.5,
        torch.randn(n, 8, generator=g),
        torch.randn(n, 1024, 8, generator=g),
        torch.randn(n, hidden, 8, generator=g) / 8**0.5,
        torch.randn(n, hidden, generator=g),
    )
    return tuple(t.to(device) for t in w)


@pytest.mark.parametrize("seed", range(8))
def test_rvq_exact_identical_to_transformers(seed, device):
    hidden, n_cb = (1024, 9) if seed < 2 else (256, 6)
    q = _make_transformers_rvq(seed, hidden, n_cb, device)
    w = _weights_of(q)
    g = torch.Generator().manual_seed(100 + seed)
    B, T = (2, 173) if seed % 2 else (3, 64)
    z = (torch.randn(B, hidden, T, generator=g) * (1 + seed % 3)).to(device)
    n = n_cb if seed % 3 else n_cb - 2
    with torch.no_grad():
        ref_q, ref_codes, ref_lat, _, _ = q(z, n_quantizers=n)
        codes, quant, lat = torch.ops.dac_fast.rvq_encode(z, *w, n, True)
        pub = ops.rvq_encode(z, *w, n, mode="exact")
    assert torch.equal(codes, ref_codes)
    assert torch.equal(pub[0], ref_codes)
    if _exact(device):
        assert torch.equal(quant, ref_q)
        assert torch.equal(lat, ref_lat)
    else:
        torch.testing.assert_close(quant, ref_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lat, ref_lat, rtol=1e-5, atol=1e-5)


def test_rvq_exact_matches_reference_many_seeds(device):
    """Cheaper, wider sweep against ops.rvq_encode_reference (which equals transformers op for op)."""
    for seed in range(12):
        w = _rvq_weights(4, 128, device, seed)
        z = _x((2, 128, 97 + seed), device, seed=seed, scale=0.5 + seed % 4)
        codes, quant, lat = torch.ops.dac_fast.rvq_encode(z, *w, 4, True)
        rc, rq, rl = ops.rvq_encode_reference(z, *w, 4)
        assert torch.equal(codes, rc), seed
        if _exact(device):
            assert torch.equal(quant, rq) and torch.equal(lat, rl), seed


def test_rvq_fast_agreement_floor(device):
    q = _make_transformers_rvq(3, 1024, 9, device)
    w = _weights_of(q)
    z = _x((2, 1024, 200), device, seed=7, scale=1.0)
    with torch.no_grad():
        codes, quant, lat = torch.ops.dac_fast.rvq_encode(z, *w, 9, True)
        fc, fq, fl = ops.rvq_encode(z, *w, 9, mode="fast")
    agreement = (fc == codes).float().mean().item()
    print(f"fast-mode code agreement with exact: {agreement:.6f}")
    assert agreement >= FAST_AGREEMENT_FLOOR
    # where all codes of a time step agree the outputs agree to rounding
    same = (fc == codes).all(dim=1)  # (B, T)
    if same.any():
        m = same.unsqueeze(1)
        torch.testing.assert_close(fq.masked_select(m), quant.masked_select(m), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fl.masked_select(m), lat.masked_select(m), rtol=1e-4, atol=1e-4)


def test_rvq_poisoned_outputs(device, monkeypatch):
    monkeypatch.setenv("DAC_FAST_POISON", "1")
    w = _rvq_weights(3, 64, device)
    z = _x((2, 64, 31), device, scale=1.0)
    rc, rq, rl = ops.rvq_encode_reference(z, *w, 3)
    for exact in (True, False):
        codes, quant, lat = torch.ops.dac_fast.rvq_encode(z, *w, 3, exact)
        assert (codes >= 0).all() and not quant.isnan().any() and not lat.isnan().any()
        if exact:
            assert torch.equal(codes, rc)
    dec = torch.ops.dac_fast.rvq_decode(rc, *w[2:])
    assert not dec.isnan().any()


@pytest.mark.parametrize("T", [1, 7, 300])
def test_rvq_decode_matches_transformers(T, device):
    q = _make_transformers_rvq(5, 256, 6, device)
    w = _weights_of(q)
    codes = torch.randint(0, 1024, (2, 6, T), generator=torch.Generator().manual_seed(T)).to(device)
    with torch.no_grad():
        ref = q.from_codes(codes)[0]
        out = ops.rvq_decode(codes, *w[2:])
        out4 = ops.rvq_decode(codes[:, :4], *w[2:])
        ref4 = ops.rvq_decode_reference(codes[:, :4], *w[2:])
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out4, ref4, rtol=1e-5, atol=1e-5 * scale)
    # non-contiguous codes and int32 codes
    out_nc = torch.ops.dac_fast.rvq_decode(codes.transpose(0, 1).contiguous().transpose(0, 1).int(), *w[2:])
    torch.testing.assert_close(out_nc, out, rtol=0, atol=0)


@pytest.mark.parametrize("exact", [True, False])
def test_rvq_encode_given_normalized_codebook_same_bits(device, exact):
    """The model passes F.normalize(codebook, dim=-1), cached per weight version: the op must give exactly what it
    gives when it normalizes the codebooks itself (both modes, fewer quantizers than codebooks too)."""
    w = _rvq_weights(5, 96, device, seed=21)
    z = _x((3, 96, 41), device, seed=22, scale=2.0)
    normalized = torch.nn.functional.normalize(w[2], dim=-1)
    for n in (5, 3):
        own = torch.ops.dac_fast.rvq_encode(z, *w, n, exact)
        given = ops.rvq_encode(z, *w, n, mode="exact" if exact else "fast", normalized_codebook=normalized)
        for a, b in zip(own, given):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="normalized_codebook must have the codebook's shape"):
        torch.ops.dac_fast.rvq_encode(z, *w, 2, exact, normalized[:, :512])


def test_rvq_bad_inputs(device):
    w = _rvq_weights(2, 64, device)
    z = _x((1, 64, 5), device)
    with pytest.raises(RuntimeError, match="codebook must have shape \\(N, 1024, 8\\)"):
        torch.ops.dac_fast.rvq_encode(z, w[0], w[1], w[2][:, :512], w[3], w[4], 2, True)
    with pytest.raises(RuntimeError, match="n_quantizers must be in \\[1, 2\\]"):
        torch.ops.dac_fast.rvq_encode(z, *w, 3, True)
    with pytest.raises(RuntimeError, match="z must be float32"):
        torch.ops.dac_fast.rvq_encode(z.double(), *w, 2, True)
    with pytest.raises(RuntimeError, match="proj_weight must have shape"):
        torch.ops.dac_fast.rvq_encode(_x((1, 32, 5), device), *w, 2, True)
    bad_codes = torch.full((1, 2, 3), 1024, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="codes must be in \\[0, 1024\\)"):
            torch.ops.dac_fast.rvq_decode(bad_codes, *w[2:])
    else:  # CUDA reads no codes back (no host sync): NaN rows instead (DacModel checks the range itself)
        bad_codes[0, :, 1] = 5  # frame 1 valid in every codebook: its output is finite
        out = torch.ops.dac_fast.rvq_decode(bad_codes, *w[2:])
        assert torch.isnan(out[..., [0, 2]]).all() and torch.isfinite(out[..., 1]).all()
    with pytest.raises(RuntimeError, match="codes has 3 codebooks but the quantizer has 2"):
        torch.ops.dac_fast.rvq_decode(torch.zeros(1, 3, 3, dtype=torch.long, device=device), *w[2:])
    with pytest.raises(ValueError, match="mode must be"):
        ops.rvq_encode(z, *w, 2, mode="approx")


# -------------------------------------------------------------------------------------- dispatch
def test_dispatch_and_backend_switch(device, monkeypatch):
    assert ops._extension_available(torch.device(device))
    x, a = _x((1, 2, 5), device), _alpha(2, device)
    with ops.backend("torch"):
        assert not ops.use_extension(x)
    with ops.backend("extension"):
        assert ops.use_extension(x)
    monkeypatch.setenv("DAC_FAST_BACKEND", "torch")
    assert ops.current_backend() == "torch" and not ops.use_extension(x)
    monkeypatch.setenv("DAC_FAST_BACKEND", "auto")
    assert ops.use_extension(x)
    # an input the kernels do not take (4-D) falls back to pure torch in auto mode
    x4 = _x((1, 2, 5, 3), device)
    torch.testing.assert_close(ops.snake(x4, a), ops.snake_reference(x4, a))
    status = ops.extension_status()
    assert status["loaded"] and device in status["devices"]


@pytest.mark.skipif(os.environ.get("DAC_FAST_BIG_TESTS") != "1", reason="needs ~9 GB; set DAC_FAST_BIG_TESTS=1")
def test_snake_int64_indexing(device):
    check_int64_indexing(device)


def check_int64_indexing(device):
    """B*C*T > 2**31 elements (fp16, ~4.3 GB each for input and output): indexing must be 64-bit."""
    B, C, T = 1, 2, 2**30 + 3
    x = torch.empty(B, C, T, device=device, dtype=torch.float16)
    x[:, 0].fill_(1.0)
    x[:, 1].fill_(-0.5)
    a = torch.tensor([0.5, 2.0], device=device)
    y = torch.ops.dac_fast.snake(x, a)
    expect = ops.snake_reference(torch.tensor([[[1.0], [-0.5]]], device=device), a).to(torch.float16)
    for t in (0, 2**30 - 1, T - 1):
        assert torch.equal(y[:, :, t : t + 1], expect)
    assert torch.equal(y[:, 1, -1000:], expect[:, 1:2, 0].expand(1, 1000))


def test_snake_opt_in_fast_sine(device, monkeypatch):
    """DAC_FAST_SNAKE_SIN=fast (CPU fp32 only): a polynomial sine, ~2 ulp, not bit-identical."""
    x = _x((2, 5, 3001), device)
    x[0, 0, :6] = torch.tensor([1e5, -3e4, float("inf"), float("nan"), 8191.9, -8192.5])
    a = _alpha(5, device)
    ref = ops.snake_reference(x, a)
    monkeypatch.setenv("DAC_FAST_SNAKE_SIN", "fast")
    out = torch.ops.dac_fast.snake(x, a)
    assert torch.equal(out.isnan(), ref.isnan())
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=2e-6, atol=4e-6)
    s, y = torch.ops.dac_fast.add_snake(x, x * 0.5, a)
    r2 = ops.snake_reference(x + x * 0.5, a)
    fin2 = r2.isfinite()
    torch.testing.assert_close(y[fin2], r2[fin2], rtol=2e-6, atol=4e-6)
    sc, bi = _x((5,), device, seed=1).abs() + 0.5, _x((5,), device, seed=2)
    y3 = torch.ops.dac_fast.scale_bias_snake(x, sc, bi, a)
    r3 = ops.snake_reference(x * sc.reshape(1, 5, 1) + bi.reshape(1, 5, 1), a)
    fin3 = r3.isfinite()
    torch.testing.assert_close(y3[fin3], r3[fin3], rtol=2e-6, atol=4e-6)
