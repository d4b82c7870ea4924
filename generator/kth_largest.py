"""The k-th largest value of each row: the threshold of top-k sampling.

``kth_largest(x, k)`` = ``torch.topk(x, k).values.amin(-1, keepdim=True)``. On CUDA (with Triton) one
program per row holds the whole row in registers and finds the value by bisection on its bits: floats
map to int32 keys in the same order (negative floats get their magnitude bits flipped), and from the
sign bit down, each of the 32 rounds keeps the next bit set when at least k keys are >= the candidate
(one count over the row per round). The result is the exact k-th largest key, mapped back. Tried and
dropped (H100, NOTES A57, A60): two bits a round by packed counts (23.5 vs 18.1 us), radix select on
shared-memory histograms of 2, 4 or 8 bits a round (best 25.5 vs 18.2 us at one row).

Why a kernel: at batch 1 an AR-B decoding step's ``torch.topk`` of 2000 out of 16384 logits runs one
thread block of radix passes, 79 us per token on an H200 against 18 us here (NOTES A26, A28: the
largest single kernel of the step after the mat-vecs). Only -0.0 and 0.0 order differently here than
in torch (the key puts -0.0 below 0.0, where topk ties them), which moves the threshold only when the
k-th largest logit is exactly zero with both signs present.
"""
from __future__ import annotations

import torch

from generator.launch import int32_offsets, on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: torch.topk
    triton = None

MAX_COLUMNS = 32768     # the kernel holds a row in registers: up to 32k float32 per program


def kth_largest_reference(x_RV: torch.Tensor, k: int) -> torch.Tensor:
    """The torch version: the smallest of an unsorted top-k (sorting the k kept would change nothing)."""
    return torch.topk(x_RV, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dimension -> (..., 1) in x's dtype; 1 <= k <= x.shape[-1]."""
    if use_kernel(x, k):
        return torch.ops.tessera.kth_largest(x.reshape(-1, x.shape[-1]), k).view(*x.shape[:-1], 1)
    return kth_largest_reference(x, k)


def use_kernel(x: torch.Tensor, k: int) -> bool:
    """The kernel covers: CUDA, Triton present, float32 rows (the samplers' logits are float32) of at most
    ``MAX_COLUMNS``, unit stride along a row. Any number of rows (past int32 offsets the op runs torch.topk):
    on an H200 it beat torch.topk from 1 to 16384 rows of 16384 (18 vs 79 us, 19 vs 66, 147 vs 274, 2209 vs
    3314; NOTES A28)."""
    return (triton is not None and x.is_cuda and x.dtype == torch.float32 and 1 <= k <= x.shape[-1] <= MAX_COLUMNS
            and x.numel() > 0 and x.stride(-1) == 1)


def launch_config(columns: int) -> tuple[int, int]:
    """(block: the row padded to a power of two, warps per program): 32 values per thread up to 8 warps (8192
    columns), then 8 warps (16384 columns: 17.7 vs 18.3 us at 16 warps, one row or 64, H100, NOTES A60)."""
    block = triton.next_power_of_2(columns)
    return block, min(8, max(1, block // (32 * 32)))


if triton is not None:
    @triton.jit
    def _kth_largest_kernel(X, OUT, V, k, stride, BLOCK: tl.constexpr):
        """One program per row: 32 rounds of 'keep bit b when >= k keys are >= prefix | bit b'."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(X + row * stride + cols, mask=cols < V, other=float("-inf"))   # padding never beats the k-th
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)          # signed int order == float order
        nonneg = tl.sum((key >= 0).to(tl.int32), axis=0)
        prefix = tl.where(nonneg >= k, 0, -2147483647 - 1).to(tl.int32)   # the sign bit first
        for b in tl.static_range(30, -1, -1):
            cand = prefix | (1 << b)
            count = tl.sum((key >= cand).to(tl.int32), axis=0)
            prefix = tl.where(count >= k, cand, prefix)
        bits = tl.where(prefix < 0, prefix ^ 0x7FFFFFFF, prefix)
        tl.store(OUT + row, bits.to(tl.float32, bitcast=True))

    def launch(x: torch.Tensor, k: int, block: int, warps: int) -> torch.Tensor:
        """The kernel on x (R, V) with unit-stride rows, one launch configuration (the benchmark times several)."""
        R, V = x.shape
        out = torch.empty(R, dtype=x.dtype, device=x.device)
        with on_device(x):
            _kth_largest_kernel[(R,)](x, out, V, k, x.stride(0), BLOCK=block, num_warps=warps)
        return out

    @torch.library.custom_op("tessera::kth_largest", mutates_args=())
    def _kth_largest_op(x: torch.Tensor, k: int) -> torch.Tensor:
        x = x if x.stride(-1) == 1 else x.contiguous()
        if not int32_offsets(x):     # checked here, on the real shapes (a compiled caller's are symbolic)
            return kth_largest_reference(x, k)[:, 0]
        return launch(x, k, *launch_config(x.shape[1]))

    @_kth_largest_op.register_fake
    def _(x, k):
        return x.new_empty(x.shape[0])
