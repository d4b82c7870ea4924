"""The Triton mat-vec benchmarks/decode_matvec.py times is the Linear (where the kernel can run: CUDA, or
Triton's CPU interpreter with TRITON_INTERPRET=1 set before the import)."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import decode_matvec as dm
from tests.kernels import KERNEL_DEVICE, needs_kernel


@needs_kernel
@pytest.mark.parametrize("cfg", [(4, 128, 2), (16, 512, 4)])
def test_matvec_is_the_linear(cfg):
    """N and K not multiples of the blocks (masked edges), two rows."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(100, 300, generator=g) * 0.02, torch.randn(2, 300, generator=g)
    y = dm.matvec(x.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), *cfg).cpu()
    torch.testing.assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5)
