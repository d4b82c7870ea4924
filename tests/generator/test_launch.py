"""Triton launches go to the current CUDA device; every kernel op in generator/ makes its tensors' device
current first (generator/launch.py), so a model on a second GPU runs its kernels there."""
import contextlib

import pytest
import torch

from generator import decode_attention, fused_attention, kth_largest
from generator.launch import on_device


def test_on_device_is_a_no_op_for_cpu_tensors():
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or fused_attention.triton is None, reason="needs two GPUs")
def test_kernels_on_the_second_gpu_equal_the_first_while_the_first_is_current():
    torch.manual_seed(0)
    qkv = torch.randn(2, 33, 3, 2, 64, dtype=torch.bfloat16)
    w, cos, sin = torch.ones(64), torch.ones(33, 32), torch.zeros(33, 32)
    x = torch.randn(4, 1000)
    q, k, v = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 40, 64), torch.randn(2, 3, 40, 64)
    mask = torch.ones(1, 40, dtype=torch.bool)
    outs = []
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0), torch.no_grad():
            outs.append([
                fused_attention.launch(qkv.to(dev), w.to(dev), w.to(dev), cos.to(dev), sin.to(dev), 1e-6).cpu(),
                kth_largest.kth_largest(x.to(dev), 7).cpu(),
                decode_attention.attend_one_query(*(t.to(dev, torch.bfloat16) for t in (q, k, v)), mask.to(dev)).cpu()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
