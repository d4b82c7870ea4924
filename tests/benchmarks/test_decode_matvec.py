"""The Triton mat-vec benchmarks/decode_matvec.py times is the Linear (where the kernel can run: CUDA, or
Triton's CPU interpreter with TRITON_INTERPRET=1 set before the import)."""
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks import decode_matvec as dm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.skipif(dm.triton is None or DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("cfg", [(4, 128, 2), (16, 512, 4)])
def test_matvec_is_the_linear(cfg):
    """N and K not multiples of the blocks (masked edges), two rows."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(100, 300, generator=g) * 0.02, torch.randn(2, 300, generator=g)
    y = dm.matvec(x.to(DEVICE), weight.to(DEVICE), *cfg).cpu()
    torch.testing.assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5)
