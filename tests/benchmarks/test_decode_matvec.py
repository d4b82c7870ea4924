"""The split-K formulation benchmarks/decode_matvec.py times is the same Linear (float32, every split)."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.decode_matvec import SHAPES, split_k_linear, split_weight


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_split_k_linear_is_the_linear(name, splits):
    K, N = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(N, K, generator=g) * 0.02, torch.randn(3, K, generator=g)
    w_skN = split_weight(weight, splits)
    assert w_skN.shape == (splits, K // splits, N) and w_skN.is_contiguous()
    torch.testing.assert_close(split_k_linear(x, w_skN), F.linear(x, weight), atol=1e-5, rtol=1e-5)
