"""generator/kth_largest.py: the top-k threshold equals torch.topk's k-th largest value; the Triton kernel
where it can run (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1 set before the import)."""
import pytest
import torch

from generator import kth_largest as kl
from generator.sampling import top_k_top_p_filter
from tests.kernels import KERNEL_DEVICE, compile_for_hopper, needs_compiler, needs_kernel


def rows_with_ties_and_signs(R: int, V: int, seed: int) -> torch.Tensor:
    """Random rows mixing large and tiny magnitudes of both signs, repeated values (ties at the
    threshold) and -inf (logits a filter removed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g) * torch.logspace(-30, 30, V)[torch.randperm(V, generator=g)]
    x[:, ::7] = x[:, 3:4]                               # many copies of one value per row
    x[0, : V // 2] = float("-inf")
    x[1] = -x[1].abs()                                 # all negative
    return x


@needs_kernel
@pytest.mark.parametrize("V,k", [(32, 1), (32, 32), (100, 17), (16384, 2000), (5000, 4999)])
def test_kernel_equals_topk_threshold(V, k):
    x = rows_with_ties_and_signs(5, V, seed=V + k).to(KERNEL_DEVICE)
    got = torch.ops.tessera.kth_largest(x, k)
    assert torch.equal(got, kl.kth_largest_reference(x, k)[:, 0])


def test_dispatch_and_filter_keep_exactly_the_top_k():
    """kth_largest on any device equals the reference (the kernel on CUDA); the filter keeps the k
    largest logits of each row (no ties here) and sets the rest to -inf."""
    x = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kl.kth_largest(x, 7), kl.kth_largest_reference(x, 7))
    assert kl.kth_largest(x, 7).shape == (2, 3, 1)
    kept = top_k_top_p_filter(x, top_k=7).isfinite()
    assert torch.equal(kept, x >= x.topk(7, dim=-1).values[..., -1:])
    assert (kept.sum(-1) == 7).all()
    assert not kl.use_kernel(x, 7)                                  # CPU: torch.topk
    assert not kl.use_kernel(x.double(), 7) and not kl.use_kernel(x, 51)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA dispatch")
def test_cuda_dispatch_uses_the_kernel_within_its_limits():
    x = torch.randn(3, 16384, device="cuda")
    assert kl.use_kernel(x, 2000) and not kl.use_kernel(x.half(), 2000)
    assert not kl.use_kernel(torch.randn(3, kl.MAX_COLUMNS + 1, device="cuda"), 2)
    assert torch.equal(kl.kth_largest(x, 2000), kl.kth_largest_reference(x, 2000))


@needs_compiler
def test_the_kernel_compiles_for_hopper():
    """AR-B's row (16384 logits) at its launch through Triton's real compiler to sm_90."""
    block, warps = kl.launch_config(16384)
    kernel = compile_for_hopper(kl._kth_largest_kernel, {"X": "*fp32", "OUT": "*fp32", "V": "i32", "k": "i32",
                                                         "stride": "i32", "BLOCK": "constexpr"},
                                dict(BLOCK=block), num_warps=warps)
    assert kernel.asm["cubin"]


@needs_kernel
@pytest.mark.parametrize("warps", [4, 16])
@pytest.mark.parametrize("V,k", [(32, 1), (32, 32), (100, 17), (5000, 4999), (16384, 2000)])
def test_every_launch_is_the_topk_threshold(warps, V, k):
    """The kernel at the benchmark's other warp counts equals the reference on rows with ties, both signs, tiny
    and huge magnitudes and -inf."""
    x = rows_with_ties_and_signs(5, V, seed=V + k).to(KERNEL_DEVICE)
    got = kl.launch(x, k, kl.launch_config(V)[0], warps)
    assert torch.equal(got, kl.kth_largest_reference(x, k)[:, 0])
