"""Every CUDA kernel body of csrc/cuda/kernels.cuh, run on the CPU emulation of the CUDA execution model.

The emulation (csrc/emulation, built here with torch.utils.cpp_extension.load; never shipped) compiles
the same kernel bodies and launch arithmetic as the CUDA build and runs each launch with CUDA's blocks
and threads: threads of a block are real threads, __syncthreads is a barrier, shuffles exchange values
between lanes, shared memory is poisoned and checked, outputs sit in poisoned guard bands. Shapes below
reach partial blocks, partial warps, more rows than gridDim.y (limits lowered), grid-stride loops,
empty inputs and odd lengths; results are compared with the CPU twin (dac_fast._C), pure torch and,
for the RVQ kernels, transformers' codes. The negative tests prove the harness fails bad kernels.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F

from dac_fast import ops
from tests.test_ops import _alpha, _make_transformers_rvq, _rvq_weights, _weights_of, _x

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(ROOT, "csrc", "emulation")
SNAKE_TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# sinf in the emulation is glibc's, the CPU twin's is ATen's: both within an ulp or so of the true sine


@pytest.fixture(scope="session")
def emu():
    from torch.utils import cpp_extension

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"  # as setup.py
    sources = [os.path.join(EMU_DIR, "emulation.cpp"), os.path.join(EMU_DIR, "runtime.cpp")]
    tag = hashlib.sha1(ROOT.encode()).hexdigest()[:8]  # one build per checkout
    cpp_extension.load(
        name=f"dac_fast_emulation_{tag}",
        sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
        extra_cflags=["-O1", std, "-ffp-contract=off"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.dac_fast_emu


def _cpu_twin_available() -> bool:
    return ops._extension_available("cpu")


needs_twin = pytest.mark.skipif(not _cpu_twin_available(), reason="dac_fast._C (CPU twin) not built")


# ------------------------------------------------------------------------------------------ snake
# (shape, max_grid_y, max_blocks): 0 keeps CUDA's limits
SNAKE_CASES = [
    ((2, 3, 1), 0, 0),  # one element per row: partial warp, 1 of 256 threads busy
    ((1, 2, 1029), 0, 0),  # odd length over two blocks of 1024 elements: partial block
    ((3, 5, 37), 4, 0),  # 15 rows over gridDim.y = 4
    ((2, 3, 4103), 2, 1),  # one block per row for the 128-bit path: its grid-stride loop
    ((2, 3, 0), 0, 0),  # empty: nothing launched
]
SNAKE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _snake_inputs(shape, dtype, mode, misalign=False):
    C = shape[1]
    x = _x(shape, "cpu", dtype)
    if misalign:  # same values, storage offset of one element: the 128-bit path must not be taken
        buf = torch.empty(x.numel() + 1, dtype=dtype)
        buf[1:].copy_(x.reshape(-1))
        x = buf[1:].view(shape)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = _alpha(C, "cpu", seed=1).reshape(C).to(acc)
    b = _x(shape, "cpu", dtype, seed=2) if mode == "add" else None
    scale = (torch.rand(C, generator=torch.Generator().manual_seed(3)) + 0.5).to(acc) if mode == "affine" else None
    bias = (torch.randn(C, generator=torch.Generator().manual_seed(4)) * 0.1).to(acc) if mode == "affine" else None
    return x, b, scale, bias, alpha


def _snake_torch(x, b, scale, bias, alpha):
    """The forward in pure torch (fp32 math, fp64 for fp64), rounded like the kernels."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = x
    if b is not None:
        u = (x.to(acc) + b.to(acc)).to(x.dtype)
    u = u.to(acc)
    if scale is not None:
        u = u * scale.view(1, -1, 1) + bias.view(1, -1, 1)
    return ops.snake_reference(u, alpha.view(1, -1, 1)).to(x.dtype), None if b is None else (x.to(acc) + b.to(acc)).to(x.dtype)


def _snake_twin(x, b, scale, bias, alpha):
    a = alpha.float().view(1, -1, 1) if x.dtype != torch.float64 else alpha.view(1, -1, 1)
    if b is not None:
        s, y = torch.ops.dac_fast.add_snake(x, b, a)
        return y, s
    if scale is not None:
        return torch.ops.dac_fast.scale_bias_snake(x, scale, bias, a), None
    return torch.ops.dac_fast.snake(x, a), None


def _close(out, ref, dtype):
    tol = SNAKE_TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * 4)


@needs_twin
@pytest.mark.parametrize("mode", ["plain", "add", "affine"])
@pytest.mark.parametrize("dtype", SNAKE_DTYPES)
@pytest.mark.parametrize("shape,max_grid_y,max_blocks", SNAKE_CASES)
def test_snake_forward(emu, shape, max_grid_y, max_blocks, dtype, mode):
    x, b, scale, bias, alpha = _snake_inputs(shape, dtype, mode)
    y, s = emu.snake_fwd(x, b, scale, bias, alpha, max_grid_y, max_blocks)
    assert not y.isnan().any(), "an output element was never written"
    twin_y, twin_s = _snake_twin(x, b, scale, bias, alpha)
    ref_y, ref_s = _snake_torch(x, b, scale, bias, alpha)
    _close(y, twin_y, dtype)
    _close(y, ref_y, dtype)
    if b is not None:
        assert torch.equal(s, twin_s) and torch.equal(s, ref_s)
    if dtype in (torch.float16, torch.bfloat16):
        # the 128-bit path (aligned input) and the element-wise fallback (misaligned input) agree bit for bit
        xm = _snake_inputs(shape, dtype, mode, misalign=True)[0]
        ym, sm = emu.snake_fwd(xm, b, scale, bias, alpha, max_grid_y, max_blocks)
        assert torch.equal(y, ym)
        if b is not None:
            assert torch.equal(s, sm)


@needs_twin
@pytest.mark.parametrize("dtype", SNAKE_DTYPES)
@pytest.mark.parametrize(
    "shape,max_grid_y,max_blocks", [((2, 3, 1), 0, 0), ((2, 3, 1500), 0, 0), ((3, 4, 33), 5, 0), ((2, 3, 4103), 2, 1), ((1, 2, 0), 0, 0)]
)
def test_snake_backward(emu, shape, max_grid_y, max_blocks, dtype):
    x = _x(shape, "cpu", dtype)
    g = _x(shape, "cpu", dtype, seed=7, scale=1.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = _alpha(shape[1], "cpu", seed=1).reshape(-1).to(acc)
    gx, ga = emu.snake_bwd(g, x, alpha, max_grid_y, max_blocks)
    twin_gx, twin_ga = torch.ops.dac_fast.snake_backward(g, x, alpha)
    _close(gx, twin_gx, dtype)
    # grad_alpha: block sums by shuffles and shared memory, then atomics across blocks (any order)
    ga_tol = dict(rtol=1e-4, atol=1e-2) if acc == torch.float32 else dict(rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(ga, twin_ga, **ga_tol)
    if dtype in (torch.float16, torch.bfloat16):  # 128-bit path versus the element-wise fallback
        buf = torch.empty(x.numel() + 1, dtype=dtype)
        buf[1:].copy_(x.reshape(-1))
        gxm, gam = emu.snake_bwd(g, buf[1:].view(shape), alpha, max_grid_y, max_blocks)
        assert torch.equal(gx, gxm)
        torch.testing.assert_close(ga, gam, **ga_tol)


# -------------------------------------------------------------------------------------------- RVQ
def _normalized_rows(n, seed):
    return F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("R", [0, 1, 9, 77])
def test_rvq_argmax(emu, R):
    enc = _normalized_rows(R, 0)
    cbn = _normalized_rows(1024, 1)
    cbn[700] = cbn[3]  # a tie: the first index wins
    if R > 2:
        enc[1] = cbn[3]
        enc[2] = float("nan")  # NaN scores count as the largest, as torch.max does
    l2, cn2 = enc.pow(2).sum(1), cbn.pow(2).sum(1)
    codes = emu.rvq_argmax(enc, cbn, l2, cn2)
    ref = (-(l2[:, None] - 2 * enc @ cbn.t()) + cn2[None, :]).max(1)[1]
    assert torch.equal(codes, ref)


def _rvq_exact_emulated(emu, z, in_w, in_b, codebook, out_w, out_b, n):
    """The exact-mode loop of csrc/dac_fast.cpp's rvq_encode with the emulated argmax and update kernels."""
    B, _, T = z.shape
    residual, quantized = z, torch.zeros_like(z)
    codes, latents = [], []
    for i in range(n):
        projected = F.conv1d(residual, in_w[i].unsqueeze(-1), in_b[i])
        enc = F.normalize(projected.permute(0, 2, 1).reshape(B * T, 8)).contiguous()
        cbn = F.normalize(codebook[i]).contiguous()
        indices = emu.rvq_argmax(enc, cbn, enc.pow(2).sum(1), cbn.pow(2).sum(1)).view(B, T)
        q = F.embedding(indices, codebook[i]).transpose(1, 2)
        out = F.conv1d(projected + (q - projected), out_w[i].unsqueeze(-1), out_b[i]).contiguous()
        # at most 3 blocks: the grid-stride loop, and fewer emulated blocks to wait for
        residual, quantized = emu.rvq_update(residual, out, quantized, i == 0, i < n - 1, 3)
        codes.append(indices)
        latents.append(projected)
    return torch.stack(codes, 1), quantized, torch.cat(latents, 1)


@pytest.mark.parametrize("B,T", [(2, 37), (1, 1)])
def test_rvq_exact_kernels_match_transformers(emu, B, T):
    q = _make_transformers_rvq(5, 256, 4, "cpu")
    w = _weights_of(q)
    z = _x((B, 256, T), "cpu", seed=11, scale=1.0)
    with torch.no_grad():
        ref_q, ref_codes, ref_lat, _, _ = q(z, n_quantizers=4)
        codes, quant, lat = _rvq_exact_emulated(emu, z, *w, 4)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(quant, ref_q)
    assert torch.equal(lat, ref_lat)


def _rvq_fast_args(z, in_w, in_b, codebook, out_w, out_b, n):
    """The fast-mode kernel inputs, as csrc/dac_fast.cpp's rvq_encode computes them."""
    D = z.shape[1]
    Win, Wout = in_w[:n], out_w[:n]
    e0 = torch.matmul(Win.reshape(n * 8, D), z).contiguous()
    A = torch.matmul(Win.unsqueeze(1), Wout.unsqueeze(0)).contiguous()
    c = torch.matmul(Win.unsqueeze(1), out_b[:n].unsqueeze(-1).unsqueeze(0)).squeeze(-1).contiguous()
    cb = codebook[:n].contiguous()
    cbn = (cb / torch.linalg.vector_norm(cb, 2, dim=2, keepdim=True).clamp_min(1e-12)).contiguous()
    return e0, in_b[:n].contiguous(), A, c, cbn, cbn.pow(2).sum(2).contiguous(), cb


@needs_twin
@pytest.mark.parametrize("B,T,n", [(2, 37, 3), (1, 1, 2), (3, 11, 1), (2, 0, 2)])
def test_rvq_fast_warp_per_step(emu, B, T, n):
    D = 64
    w = _rvq_weights(n, D, "cpu", seed=3)
    z = _x((B, D, T), "cpu", seed=12, scale=1.0)
    codes, lat, Q = emu.rvq_fast(*_rvq_fast_args(z, *w, n))
    twin_codes, twin_quant, twin_lat = torch.ops.dac_fast.rvq_encode(z, *w, n, False)
    assert torch.equal(codes, twin_codes)
    assert torch.equal(lat, twin_lat)
    Wcat = w[3][:n].permute(1, 0, 2).reshape(D, n * 8)
    assert torch.equal(torch.matmul(Wcat, Q).add_(w[4][:n].sum(0).view(1, D, 1)), twin_quant)


@pytest.mark.parametrize("B,n,T,max_blocks", [(2, 3, 37, 0), (2, 3, 37, 1), (1, 1, 1, 0), (1, 2, 0, 0)])
def test_rvq_gather(emu, B, n, T, max_blocks):
    cb = torch.randn(n, 1024, 8, generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 1024, (B, n, T), generator=torch.Generator().manual_seed(1))
    Q = emu.rvq_gather(codes, cb, max_blocks)
    ref = torch.stack([cb[i][codes[:, i]] for i in range(n)], 1).permute(0, 1, 3, 2).reshape(B, n * 8, T)
    assert torch.equal(Q, ref)


def test_rvq_gather_bad_codes_give_nan_rows(emu):
    """The CUDA op does not read codes back to check them: a code outside [0, 1024) gives a NaN row, never an
    out-of-bounds read; the other rows are the codebooks'."""
    cb = torch.randn(2, 1024, 8, generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 1024, (2, 2, 9), generator=torch.Generator().manual_seed(1))
    codes[0, 1, 3], codes[1, 0, 8], codes[1, 1, 0] = -1, 1024, 1 << 40
    Q = emu.rvq_gather(codes, cb, 0).view(2, 2, 8, 9)
    bad = (codes < 0) | (codes >= 1024)
    assert torch.isnan(Q).all(2).eq(bad).all() and not torch.isnan(Q).any(2).logical_and(~bad).any()
    good = torch.stack([cb[i][codes[:, i].clamp(0, 1023)] for i in range(2)], 1).permute(0, 1, 3, 2)
    assert torch.equal(Q.masked_fill(bad.unsqueeze(2), 0), good.masked_fill(bad.unsqueeze(2), 0))


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("write_residual", [True, False])
@pytest.mark.parametrize("numel,max_blocks", [(1, 0), (1000, 1), (1000, 0)])
def test_rvq_update(emu, first, write_residual, numel, max_blocks):
    r_in, o, q = (torch.randn(numel, generator=torch.Generator().manual_seed(s)) for s in range(3))
    r_out, q_out = emu.rvq_update(r_in, o, q, first, write_residual, max_blocks)
    assert torch.equal(q_out, (0.0 + o) if first else q + o)
    if write_residual:
        assert torch.equal(r_out, r_in - o)


# -------------------------------------------------------------------------------- the harness itself
@pytest.mark.parametrize(
    "kernel,message",
    [
        ("divergent_barrier", "divergent __syncthreads"),
        ("shuffle_deadlock", "deadlock"),
        ("uninitialized_shared", "uninitialized shared memory"),
        ("missing_barrier", "uninitialized shared memory|shared-memory race"),
        ("out_of_bounds", "wrote outside its output"),
    ],
)
def test_emulation_catches_bad_kernels(emu, kernel, message):
    emu.set_timeout_ms(1500)
    try:
        with pytest.raises(RuntimeError, match=message):
            emu.bad_kernel(kernel)
    finally:
        emu.set_timeout_ms(20000)
