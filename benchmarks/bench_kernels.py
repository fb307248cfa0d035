"""Kernel benchmarks: each dac_fast op against the eager torch code it replaces and against
torch.compile of that code, at DAC's real shapes, on CPU (and CUDA when present).

    python benchmarks/bench_kernels.py --tuned-allocator --repeats 3 --json out.json --markdown out.md

Reported per op and shape: median time of each implementation, speedup of ours over eager and over
compiled, and our achieved GB/s against the bytes that must move (inputs read once, outputs written
once). Both sides always run in the same process under the same allocator setting, which is stated
in the output: with glibc's default settings every large temporary is a fresh mmap whose page
faults cost as much as the arithmetic; --tuned-allocator sets mallopt(M_MMAP_MAX=0) and
mallopt(M_TRIM_THRESHOLD=2**31-1) at process start (before torch allocates anything).

The eager quantizer is transformers' DacResidualVectorQuantizer (eval) and its from_codes when
transformers is installed, else dac_fast.ops' op-for-op references.
"""

from __future__ import annotations

import argparse
import gc
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tuned-allocator", action="store_true", help="glibc mallopt tuning at start (see above)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--ops", default="snake,add_snake,scale_bias_snake,rvq_encode,rvq_decode")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--small", action="store_true", help="smaller shapes (smoke test)")
    p.add_argument("--snake-shapes", default=None, help="e.g. 8x96x441000,16x1536x862 ('' for none)")
    p.add_argument("--rvq-shapes", default=None, help="BxDxTxN list, e.g. 16x1024x862x9,16x1024x750x32 ('' for none)")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    return p.parse_args()


ARGS = _parse()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not pip-installed
from dac_fast.runtime import allocator_setting  # noqa: E402  (imports no torch)

ALLOCATOR = allocator_setting("tuned" if ARGS.tuned_allocator else "default")

import torch  # noqa: E402  (after the allocator tuning)

from dac_fast import ops  # noqa: E402

if ARGS.threads:
    torch.set_num_threads(ARGS.threads)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _compile(fn):
    return torch.compile(fn, dynamic=False)


_COMPILE_STATE = {"ok": True}


def _compile_ok():
    return _COMPILE_STATE["ok"]


def _guard_compile(fn):
    """Run a benchmark block that uses torch.compile; a compiler failure disables the column."""
    try:
        fn()
    except Exception as exc:  # e.g. no working inductor backend on this machine
        _COMPILE_STATE["ok"] = False
        print(f"  torch.compile failed, compiled column skipped: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def _transformers_rvq(N, D, device):
    try:
        import transformers
        from transformers.models.dac.modeling_dac import DacResidualVectorQuantizer
    except Exception:
        return None
    cfg = transformers.DacConfig(hidden_size=D, n_codebooks=N, codebook_size=1024, codebook_dim=8)
    torch.manual_seed(0)
    q = DacResidualVectorQuantizer(cfg).eval()
    with torch.no_grad():
        for name, p in q.named_parameters():
            p.copy_(torch.randn_like(p) * (p.shape[1] ** -0.5 if "proj.weight" in name else 1.0))
    return q.to(device)


def _rvq_weights(q):
    qs = q.quantizers
    return (
        torch.stack([m.in_proj.weight.squeeze(-1) for m in qs]).detach().contiguous(),
        torch.stack([m.in_proj.bias for m in qs]).detach().contiguous(),
        torch.stack([m.codebook.weight for m in qs]).detach().contiguous(),
        torch.stack([m.out_proj.weight.squeeze(-1) for m in qs]).detach().contiguous(),
        torch.stack([m.out_proj.bias for m in qs]).detach().contiguous(),
    )


def bench_device(device, records):
    R, W = ARGS.repeats, ARGS.warmup
    wanted = set(ARGS.ops.split(","))
    snake_shapes = [(8, 96, 441000), (16, 1536, 862)] if not ARGS.small else [(2, 96, 44100), (2, 1536, 862)]
    rvq_shapes = [((16, 1024, 862), 9), ((16, 1024, 750), 32)] if not ARGS.small else [((2, 1024, 862), 9)]
    if ARGS.snake_shapes is not None:
        snake_shapes = [tuple(int(v) for v in t.split("x")) for t in ARGS.snake_shapes.split(",") if t]
    if ARGS.rvq_shapes is not None:
        rvq_shapes = []
        for t in ARGS.rvq_shapes.split(","):
            if t:
                b, d, tt, n = (int(v) for v in t.split("x"))
                rvq_shapes.append(((b, d, tt), n))
    use_compile = not ARGS.no_compile

    def record(op, shape, impl, t, nbytes, extra=None):
        rec = {"op": op, "shape": list(shape), "device": device, "impl": impl, "time_s": t,
               "gbps": nbytes / t / 1e9 if t else None, "bytes": nbytes}
        rec.update(extra or {})
        records.append(rec)
        print(f"  {op:17s} {str(tuple(shape)):22s} {impl:9s} {t * 1e3:10.2f} ms  {rec['gbps']:8.2f} GB/s", flush=True)

    with torch.no_grad():
        for shape in snake_shapes:
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(*shape, generator=g) * 3).to(device)
            C = shape[1]
            alpha = (torch.rand(1, C, 1, generator=g) + 0.1).to(device)
            n = x.numel() * 4
            out = torch.empty_like(x)
            record("copy", shape, "copy_", _time(lambda: out.copy_(x), device, R, W), 2 * n)
            if "snake" in wanted:
                eager = ops.snake_reference
                diff = (torch.ops.dac_fast.snake(x, alpha) - eager(x, alpha)).abs().max().item()
                record("snake", shape, "eager", _time(lambda: eager(x, alpha), device, R, W), 2 * n)
                if use_compile and _compile_ok():
                    def _c():
                        ce = _compile(eager)
                        t0 = time.perf_counter()
                        ce(x, alpha)
                        record("snake", shape, "compiled", _time(lambda: ce(x, alpha), device, R, W), 2 * n,
                               {"compile_s": time.perf_counter() - t0})
                    _guard_compile(_c)
                record("snake", shape, "dac_fast", _time(lambda: torch.ops.dac_fast.snake(x, alpha), device, R, W), 2 * n,
                       {"max_abs_diff_vs_eager": diff})
                if device == "cpu":  # the opt-in polynomial sine (not bit-identical)
                    os.environ["DAC_FAST_SNAKE_SIN"] = "fast"
                    try:
                        d2 = (torch.ops.dac_fast.snake(x, alpha) - eager(x, alpha)).abs().max().item()
                        record("snake", shape, "fast_sin", _time(lambda: torch.ops.dac_fast.snake(x, alpha), device, R, W),
                               2 * n, {"max_abs_diff_vs_eager": d2})
                    finally:
                        del os.environ["DAC_FAST_SNAKE_SIN"]
            if "add_snake" in wanted:
                b = torch.randn_like(x)

                def eager_add(a, b, al):
                    s = a + b
                    return s, ops.snake_reference(s, al)

                record("add_snake", shape, "eager", _time(lambda: eager_add(x, b, alpha), device, R, W), 4 * n)
                if use_compile and _compile_ok():
                    def _c():
                        ce = _compile(eager_add)
                        ce(x, b, alpha)
                        record("add_snake", shape, "compiled", _time(lambda: ce(x, b, alpha), device, R, W), 4 * n)
                    _guard_compile(_c)
                record("add_snake", shape, "dac_fast", _time(lambda: torch.ops.dac_fast.add_snake(x, b, alpha), device, R, W),
                       4 * n)
                del b
                gc.collect()
            if "scale_bias_snake" in wanted:
                sc = torch.rand(C, device=device) + 0.5
                bi = torch.randn(C, device=device)

                def eager_sbs(y, sc, bi, al):
                    return ops.snake_reference(y * sc.reshape(1, -1, 1) + bi.reshape(1, -1, 1), al)

                record("scale_bias_snake", shape, "eager", _time(lambda: eager_sbs(x, sc, bi, alpha), device, R, W), 2 * n)
                if use_compile and _compile_ok():
                    def _c():
                        ce = _compile(eager_sbs)
                        ce(x, sc, bi, alpha)
                        record("scale_bias_snake", shape, "compiled", _time(lambda: ce(x, sc, bi, alpha), device, R, W), 2 * n)
                    _guard_compile(_c)
                record("scale_bias_snake", shape, "dac_fast",
                       _time(lambda: torch.ops.dac_fast.scale_bias_snake(x, sc, bi, alpha), device, R, W), 2 * n)
            del x, out

        for (B, D, T), N in rvq_shapes:
            q = _transformers_rvq(N, D, device)
            g = torch.Generator().manual_seed(1)
            z = torch.randn(B, D, T, generator=g).to(device)
            if q is not None:
                w = _rvq_weights(q)
                eager_enc = lambda: q(z, n_quantizers=N)  # noqa: E731
                eager_name = "transformers"
            else:
                g2 = torch.Generator().manual_seed(2)
                w = (torch.randn(N, 8, D, generator=g2) / D**0.5, torch.randn(N, 8, generator=g2),
                     torch.randn(N, 1024, 8, generator=g2), torch.randn(N, D, 8, generator=g2) / 8**0.5,
                     torch.randn(N, D, generator=g2))
                w = tuple(t.to(device) for t in w)
                eager_enc = lambda: ops.rvq_encode_reference(z, *w, N)  # noqa: E731
                eager_name = "ops reference"
            nb_enc = z.numel() * 4 * 2 + B * N * 8 * T * 4 + B * N * T * 8
            codes = torch.ops.dac_fast.rvq_encode(z, *w, N, True)[0]
            if "rvq_encode" in wanted:
                ref_codes = eager_enc()[1] if q is not None else eager_enc()[0]
                same = bool(torch.equal(codes, ref_codes))
                fast_codes = torch.ops.dac_fast.rvq_encode(z, *w, N, False)[0]
                agree = (fast_codes == codes).float().mean().item()
                shp = (B, D, T, N)
                record("rvq_encode", shp, "eager", _time(eager_enc, device, R, W), nb_enc, {"eager_impl": eager_name})
                if use_compile and _compile_ok():
                    def _c():
                        ce = _compile(lambda z: ops.rvq_encode_reference(z, *w, N))
                        t0 = time.perf_counter()
                        ce(z)
                        record("rvq_encode", shp, "compiled", _time(lambda: ce(z), device, R, W), nb_enc,
                               {"compile_s": time.perf_counter() - t0})
                    _guard_compile(_c)
                record("rvq_encode", shp, "dac_fast", _time(lambda: torch.ops.dac_fast.rvq_encode(z, *w, N, True), device, R, W),
                       nb_enc, {"codes_identical_to_eager": same, "mode": "exact"})
                record("rvq_encode", shp, "fast", _time(lambda: torch.ops.dac_fast.rvq_encode(z, *w, N, False), device, R, W),
                       nb_enc, {"code_agreement_vs_exact": agree, "mode": "fast"})
            if "rvq_decode" in wanted:
                nb_dec = codes.numel() * 8 + B * D * T * 4
                shp = (B, D, T, N)
                eager_dec = (lambda: q.from_codes(codes)[0]) if q is not None else (lambda: ops.rvq_decode_reference(codes, *w[2:]))
                ref = eager_dec()
                ours = torch.ops.dac_fast.rvq_decode(codes, *w[2:])
                rel = ((ours - ref).abs().max() / ref.abs().max()).item()
                record("rvq_decode", shp, "eager", _time(eager_dec, device, R, W), nb_dec, {"eager_impl": eager_name})
                if use_compile and _compile_ok():
                    def _c():
                        ce = _compile(lambda c: ops.rvq_decode_reference(c, *w[2:]))
                        ce(codes)
                        record("rvq_decode", shp, "compiled", _time(lambda: ce(codes), device, R, W), nb_dec)
                    _guard_compile(_c)
                record("rvq_decode", shp, "dac_fast", _time(lambda: torch.ops.dac_fast.rvq_decode(codes, *w[2:]), device, R, W),
                       nb_dec, {"max_rel_diff_vs_eager": rel})
            del z, q


def _markdown(records, header):
    rows = {}
    for r in records:
        key = (r["device"], r["op"], tuple(r["shape"]))
        rows.setdefault(key, {})[r["impl"]] = r
    lines = [header, "",
             "| device | op | shape | eager | compiled | dac_fast | vs eager | vs compiled | dac_fast GB/s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    copies = {(k[0], k[2]): v["copy_"]["time_s"] for k, v in rows.items() if k[1] == "copy"}
    for (dev, op, shape), impls in rows.items():
        if op == "copy":
            c = impls["copy_"]
            lines.append(f"| {dev} | copy (x -> preallocated) | {shape} | | | {c['time_s'] * 1e3:.1f} ms | | | {c['gbps']:.1f} | bandwidth reference |")
            continue
        e, cpl, ours = impls.get("eager"), impls.get("compiled"), impls.get("dac_fast")
        if ours is None:
            continue
        fmt = lambda r: f"{r['time_s'] * 1e3:.1f} ms" if r else "-"  # noqa: E731
        vs_e = f"{e['time_s'] / ours['time_s']:.1f}x" if e else "-"
        vs_c = f"{cpl['time_s'] / ours['time_s']:.1f}x" if cpl else "-"
        notes = []
        if "max_abs_diff_vs_eager" in ours:
            notes.append(f"max abs diff vs eager {ours['max_abs_diff_vs_eager']:.1e}")
        if (dev, shape) in copies and op != "copy":
            notes.append(f"time = {ours['time_s'] / copies[(dev, shape)]:.2f}x the copy's")
        if "codes_identical_to_eager" in ours:
            notes.append(f"exact mode, codes identical: {ours['codes_identical_to_eager']}; eager = {e.get('eager_impl') if e else ''}")
        if "max_rel_diff_vs_eager" in ours:
            notes.append(f"max rel diff {ours['max_rel_diff_vs_eager']:.1e}")
        if cpl and "compile_s" in cpl:
            notes.append(f"compile {cpl['compile_s']:.0f} s")
        lines.append(f"| {dev} | {op} | {shape} | {fmt(e)} | {fmt(cpl)} | {fmt(ours)} | {vs_e} | {vs_c} | {ours['gbps']:.1f} | {'; '.join(notes)} |")
        fs = impls.get("fast_sin")
        if fs:
            vs_e = f"{e['time_s'] / fs['time_s']:.1f}x" if e else "-"
            vs_c = f"{cpl['time_s'] / fs['time_s']:.1f}x" if cpl else "-"
            lines.append(f"| {dev} | snake, DAC_FAST_SNAKE_SIN=fast | {shape} | | | {fmt(fs)} | {vs_e} | {vs_c} | {fs['gbps']:.1f} | "
                         f"opt-in polynomial sine, max abs diff vs eager {fs['max_abs_diff_vs_eager']:.1e} |")
        f = impls.get("fast")
        if f:
            vs_e = f"{e['time_s'] / f['time_s']:.1f}x" if e else "-"
            vs_c = f"{cpl['time_s'] / f['time_s']:.1f}x" if cpl else "-"
            lines.append(f"| {dev} | rvq_encode fast | {shape} | | | {fmt(f)} | {vs_e} | {vs_c} | {f['gbps']:.1f} | code agreement vs exact {f['code_agreement_vs_exact']:.5f} |")
    return "\n".join(lines)


def main():
    if not ops._extension_available("cpu"):
        sys.exit("dac_fast._C is not built: python setup.py build_ext --inplace")
    devices = []
    if ARGS.device in ("auto", "all", "cpu"):
        devices.append("cpu")
    if ARGS.device in ("auto", "all", "cuda") and torch.cuda.is_available() and ops._extension_available("cuda"):
        devices.append("cuda")
    if ARGS.device == "auto" and "cuda" in devices:
        devices = ["cuda", "cpu"] if ARGS.small else ["cuda"]
    if "cuda" in devices:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join([sys.executable.split('/')[-1]] + sys.argv),
            "machine": machine, "allocator": ALLOCATOR, "loadavg_at_start": os.getloadavg(), "repeats": ARGS.repeats, "dtype": "float32"}
    print(json.dumps(meta, indent=1), flush=True)
    records = []
    for dev in devices:
        print(f"== {dev}", flush=True)
        bench_device(dev, records)
    meta["loadavg_at_end"] = os.getloadavg()
    header = (f"`{meta['command']}` — {meta['date']} — {machine}; allocator: {ALLOCATOR}; fp32; median of {ARGS.repeats} "
              f"after {ARGS.warmup} warm-up; load average at start/end {meta['loadavg_at_start'][0]:.1f}/{meta['loadavg_at_end'][0]:.1f}")
    md = _markdown(records, header)
    print(md)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
    if ARGS.markdown:
        with open(ARGS.markdown, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
