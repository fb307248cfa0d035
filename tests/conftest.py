"""Shared test setup.

TF32 off for every test: cuDNN convolutions default to TF32 on Ampere and later GPUs, so a CUDA parity
test against transformers would otherwise compare our fp32 result with a reference computed in TF32 and
fail (or pass) for the wrong reason. One fixture here instead of one per test; on a CPU-only machine the
flags are inert.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _tf32_off():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
