"""Every dac_fast kernel on small shapes, through ``torch.ops.dac_fast`` only: the program that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck) with its kernel-name filter
on our kernels. No pytest, no transformers, no model: under instrumentation only our launches cost time.

    python scripts/kernel_cases.py [--device cuda|cpu] [--list]

Cases: each kernel (Snake forward in its three modes, element-wise and 128-bit packed paths; Snake backward,
both paths; the RVQ argmax, residual update, fused fast path and code gather) in every dtype it takes, on
odd lengths, partial blocks, misaligned 16-bit views (the packed path's fallback), more rows than one grid
dimension holds (65535) and out-of-range codes (the gather's NaN rows). Each result is checked against the
pure-torch reference of dac_fast.ops (finite where it should be, shapes, values within the dtype's
tolerance, code agreement), so a case that runs but computes garbage fails too. Prints one line per case;
exit status 1 when any case fails. On the CPU (the rehearsal) the same cases run the CPU kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dac_fast import ops  # noqa: E402

GRID_Y = 65535  # rows beyond this loop over gridDim.y
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
N_CODEBOOKS, CODEBOOK_SIZE, CODEBOOK_DIM = 3, 1024, 8


def _tensor(shape, dtype, device, seed, offset=0):
    """Seeded values; ``offset`` elements into a flat buffer (offset 1 of a 16-bit type: a view that is not
    16-byte aligned, which the packed path must decline)."""
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    flat = torch.randn(n + offset, generator=gen, dtype=torch.float64).mul_(2).to(dtype).to(device)
    return flat[offset:].view(shape)


def _alpha(channels, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(channels, generator=gen) * 1.5 + 0.1).to(device)


def _close(name, got, want, dtype):
    tol = TOLERANCE[dtype]
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    err = ((got - want).abs() / (want.abs() + 1)).max().item()
    return None if err <= tol else f"{name}: max relative error {err:.3g} > {tol:g}"


def snake_cases(device):
    """(name, run) for the Snake kernels; run() -> None when correct, else a message."""
    shapes = [("odd", (3, 5, 4099), 0), ("partial-block", (2, 3, 1025), 0), ("one-sample", (2, 3, 1), 0),
              ("packs", (2, 4, 8 * 256 + 8), 0), ("misaligned", (2, 4, 2051), 1),
              ("rows>gridY", (1, GRID_Y + 6, 3), 0)]
    cases = []
    for dtype in DTYPES:
        for label, shape, offset in shapes:
            if offset and dtype.itemsize != 2:
                continue  # the alignment fallback exists on the 16-bit packed path only
            if label == "rows>gridY" and dtype == torch.float64:
                continue
            cases.append((f"snake {label} {str(dtype)[6:]}", _snake_case(shape, dtype, device, offset)))
    return cases


def _snake_case(shape, dtype, device, offset):
    def run():
        c = shape[1]
        x = _tensor(shape, dtype, device, 2, offset)
        b = _tensor(shape, dtype, device, 3, offset)
        g = _tensor(shape, dtype, device, 4, offset)
        alpha, scale, bias = _alpha(c, device), _alpha(c, device, 5), _alpha(c, device, 6) - 0.5
        xr, br, gr = x.double(), b.double(), g.double()
        ar = alpha.double().view(1, c, 1)
        for name, got, want in (
            ("snake", torch.ops.dac_fast.snake(x, alpha), ops.snake_reference(xr, ar)),
            ("add_snake", torch.ops.dac_fast.add_snake(x, b, alpha)[1], ops.snake_reference(xr + br, ar)),
            ("scale_bias_snake", torch.ops.dac_fast.scale_bias_snake(x, scale, bias, alpha),
             ops.snake_reference(xr * scale.double().view(1, c, 1) + bias.double().view(1, c, 1), ar)),
        ):
            problem = _close(name, got, want, dtype)
            if problem:
                return problem
        grad_x, grad_alpha = torch.ops.dac_fast.snake_backward(g, x, alpha)
        xq = xr.clone().requires_grad_()
        aq = ar.clone().requires_grad_()
        ops.snake_reference(xq, aq).backward(gr)
        return (_close("snake_backward grad_x", grad_x, xq.grad, dtype)
                or _close("snake_backward grad_alpha", grad_alpha.reshape(-1), aq.grad.reshape(-1),
                          torch.float32 if dtype == torch.float64 else dtype))
    return run


def rvq_cases(device):
    cases = []
    for label, (batch, width, frames) in (("odd", (2, 32, 37)), ("one-frame", (1, 16, 1)),
                                          ("partial-warps", (3, 24, 45))):
        for mode in ("exact", "fast"):
            cases.append((f"rvq_encode {mode} {label}", _rvq_encode_case(batch, width, frames, mode, device)))
        cases.append((f"rvq_decode {label}", _rvq_decode_case(batch, width, frames, device)))
    return cases


def _rvq_weights(width, device):
    gen = torch.Generator().manual_seed(7)
    n, k, d = N_CODEBOOKS, CODEBOOK_SIZE, CODEBOOK_DIM
    return [t.to(device) for t in (torch.randn(n, d, width, generator=gen) * 0.3, torch.randn(n, d, generator=gen) * 0.1,
                                   torch.randn(n, k, d, generator=gen), torch.randn(n, width, d, generator=gen) * 0.3,
                                   torch.randn(n, width, generator=gen) * 0.1)]


def _rvq_encode_case(batch, width, frames, mode, device):
    def run():
        weights = _rvq_weights(width, device)
        z = _tensor((batch, width, frames), torch.float32, device, 8)
        codes, quantized, latents = torch.ops.dac_fast.rvq_encode(z, *weights, N_CODEBOOKS, mode == "exact")
        ref_codes, ref_quantized, _ = ops.rvq_encode_reference(z, *weights, N_CODEBOOKS)
        if codes.shape != ref_codes.shape or latents.shape != (batch, N_CODEBOOKS * CODEBOOK_DIM, frames):
            return f"shapes codes {tuple(codes.shape)}, latents {tuple(latents.shape)}"
        agreement = (codes == ref_codes).double().mean().item()
        need = 1.0 if mode == "exact" else 0.9
        if agreement < need:
            return f"codes agree {100 * agreement:.2f}% with the reference (need {100 * need:g}%)"
        if mode == "exact":
            return _close("quantized", quantized, ref_quantized, torch.float32)
        return None if torch.isfinite(quantized).all() else "non-finite quantized"
    return run


def _rvq_decode_case(batch, width, frames, device):
    def run():
        weights = _rvq_weights(width, device)
        codebook, out_w, out_b = weights[2], weights[3], weights[4]
        gen = torch.Generator().manual_seed(9)
        codes = torch.randint(0, CODEBOOK_SIZE, (batch, N_CODEBOOKS, frames), generator=gen).to(device)
        problem = _close("rvq_decode", torch.ops.dac_fast.rvq_decode(codes, codebook, out_w, out_b),
                         ops.rvq_decode_reference(codes, codebook, out_w, out_b), torch.float32)
        if problem or device == "cpu":  # the CPU op raises on bad codes; CUDA gives NaN rows
            return problem
        bad = codes.clone()
        bad[0, 1, frames // 2] = CODEBOOK_SIZE + 5
        bad[-1, 0, 0] = -3
        out = torch.ops.dac_fast.rvq_decode(bad, codebook, out_w, out_b)
        nan_frames = sorted(set(torch.isnan(out).any(1).nonzero()[:, 1].tolist()))
        expected = sorted({frames // 2, 0})
        return None if nan_frames == expected else f"bad codes: NaN in frames {nan_frames}, expected {expected}"
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    args = p.parse_args(argv)
    cases = snake_cases(args.device) + rvq_cases(args.device)
    if args.list:
        print("\n".join(name for name, _ in cases))
        return 0
    # the references' convolutions and products in full fp32, as the kernels' (cuDNN defaults to TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not ops._extension_available(args.device):
        print(f"dac_fast._C has no {args.device} kernels: {ops.extension_status()}", file=sys.stderr)
        return 1
    failed = []
    for name, run in cases:
        start = time.perf_counter()
        try:
            problem = run()
        except Exception as exc:  # noqa: BLE001 - a kernel error is this case's failure, the others still run
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if args.device == "cuda":
            torch.cuda.synchronize()
        status = "ok" if problem is None else f"FAIL {problem}"
        print(f"{name:40s} {time.perf_counter() - start:6.2f} s  {status}", flush=True)
        if problem is not None:
            failed.append(name)
    print(f"{len(cases) - len(failed)} of {len(cases)} kernel cases ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
