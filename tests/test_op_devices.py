"""Every dac_fast._C front end refuses tensors on more than one device with a message naming both.

Without a GPU the CPU kernel is called directly (a redispatch to the CPU key) with one argument on the
meta device; with a GPU, the CUDA case mixes CPU and CUDA tensors through the normal dispatcher.
"""

import pytest
import torch

from dac_fast import ops

pytestmark = pytest.mark.skipif(not ops._extension_available("cpu"), reason="dac_fast._C is not built")

B, C, T, D, N = 2, 3, 17, 16, 4


def _args(op, device):
    """Valid arguments of `op` (names, tensors) on `device`."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if op == "snake":
        return ["x", "alpha"], [r(B, C, T), r(1, C, 1)]
    if op == "add_snake":
        return ["a", "b", "alpha"], [r(B, C, T), r(B, C, T), r(1, C, 1)]
    if op == "scale_bias_snake":
        return ["y", "scale", "bias", "alpha"], [r(B, C, T), r(C), r(C), r(1, C, 1)]
    if op == "snake_backward":
        return ["grad", "x", "alpha"], [r(B, C, T), r(B, C, T), r(1, C, 1)]
    if op == "rvq_encode":
        names = ["z", "in_proj_weight", "in_proj_bias", "codebook", "out_proj_weight", "out_proj_bias"]
        return names, [r(B, D, T), r(N, 8, D), r(N, 8), r(N, 1024, 8), r(N, D, 8), r(N, D)]
    if op == "rvq_decode":
        codes = torch.randint(0, 1024, (B, 2, T), generator=g).to(device)
        return ["codes", "codebook", "out_proj_weight", "out_proj_bias"], [codes, r(N, 1024, 8), r(N, D, 8), r(N, D)]
    raise AssertionError(op)


def _extra(op):
    return {"rvq_encode": (2, True)}.get(op, ())


OPS = ["snake", "add_snake", "scale_bias_snake", "snake_backward", "rvq_encode", "rvq_decode"]


@pytest.mark.parametrize("op", OPS)
def test_cpu_front_end_refuses_a_second_device(op):
    names, tensors = _args(op, "cpu")
    overload = getattr(torch.ops.dac_fast, op).default
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    overload.redispatch(cpu_only, *tensors, *_extra(op))  # valid arguments pass
    for i, name in enumerate(names):
        mixed = list(tensors)
        mixed[i] = mixed[i].to("meta")
        with pytest.raises(RuntimeError, match=rf"dac_fast::{op}: all tensors must be on one device, but .* is on "
                                               rf"(cpu and {name} is on meta|meta and \w+ is on cpu)"):
            overload.redispatch(cpu_only, *mixed, *_extra(op))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.skipif(not ops._extension_available("cuda"), reason="dac_fast._C has no CUDA kernels")
@pytest.mark.parametrize("op", OPS)
def test_cuda_front_end_refuses_cpu_tensors(op):
    names, tensors = _args(op, "cuda")
    overload = getattr(torch.ops.dac_fast, op).default
    overload(*tensors, *_extra(op))
    for i, name in enumerate(names):
        mixed = list(tensors)
        mixed[i] = mixed[i].cpu()
        with pytest.raises(RuntimeError, match=rf"dac_fast::{op}: all tensors must be on one device"):
            overload(*mixed, *_extra(op))
