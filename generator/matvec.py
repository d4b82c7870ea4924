"""Linear layers on a few rows (a cached decoding step) as one Triton mat-vec.

``linear_few_rows(x, weight)`` = ``F.linear(x, weight)`` for x of at most ``MAX_ROWS`` rows, in the weight's
dtype (x cast to it, as autocast would). Program p reads weight rows [p BLOCK_N, (p + 1) BLOCK_N) once, in
BLOCK_K columns at a time, against every row of x, summing the products in float32, and rounds once.

Why (benchmarks/NOTES.md A49): at batch 1 with CFG each Linear of an AR step runs on M = 2 rows, a read of its
weight that takes a few microseconds, latency-bound (A26: the 48 mat-vecs per token are ~53% of the GPU time
per image). Session 9's micro-benchmark (H200, 20 calls replayed from one CUDA graph, AR-B's shapes) had an
earlier version of this kernel (the best of a sweep of block sizes and warps; it reduced across lanes at every
step of the loop, which this one does once) faster than cuBLAS where the output is no wider than the input
(N <= K: the attention's output projection 4.0 -> 2.6 us, the MLP's down projection 7.3 -> 4.2 us), and slower
where it is wider (qkv 3.3 -> 3.6, gate_up 3.6 -> 4.6, head 6.1 -> 11.0), so ``use_kernel`` takes N <= K only.
``Attention`` and ``SwiGLU`` call it (through ``transformer.linear``) for their output layers.

Off by default until measured end to end (job ``sample-ar-matvec``); TESSERA_MATVEC=1 turns it on. A different
sum order from cuBLAS's: equal to bf16 rounding, which can move a late token of a sampled sequence.
``LAUNCH`` is a first guess (the sweep that chose the H200's configs kept only their times): set it from
``python3 -m benchmarks.decode_matvec``, which sweeps this kernel.
"""
from __future__ import annotations

import os

import torch

from generator.launch import int32_offsets, linear_in_half, on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: F.linear
    triton = None

ENABLED = os.environ.get("TESSERA_MATVEC") == "1"
MAX_ROWS = 8              # batch 1-4 under CFG; past a few rows cuBLAS's tiles use the weight reads well
LAUNCH = (4, 512, 2)      # BLOCK_N weight rows per program, BLOCK_K columns per step, warps (NOTES A49)


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) for x (..., K) of at most ``MAX_ROWS`` rows, through the kernel, in
    the weight's dtype. Only where ``use_kernel`` says (or on Triton's CPU interpreter, in tests)."""
    K = x.shape[-1]
    x_MK = x.reshape(-1, K).to(weight.dtype)
    return torch.ops.tessera.linear_few_rows(x_MK, weight).view(*x.shape[:-1], weight.shape[0])


def use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``ENABLED``, CUDA, Triton present, no autograd (forward only), a bf16/fp16 weight whose dtype is what
    ``F.linear`` computes in (x's, or CUDA autocast's), and the shapes of ``few_rows``."""
    if not (ENABLED and triton is not None and x.is_cuda and weight.is_cuda and not torch.is_grad_enabled()):
        return False
    return linear_in_half(x, weight) and few_rows(x, weight)


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What the kernel covers and wins at: x (..., K) of at most ``MAX_ROWS`` rows, a contiguous weight (N, K)
    and an output no wider than the input (N <= K)."""
    N, K = weight.shape
    return weight.is_contiguous() and x.shape[-1] == K and x.numel() <= MAX_ROWS * K and N <= K


def launch(x_MK: torch.Tensor, weight_NK: torch.Tensor, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    """The kernel on contiguous x (M, K) and weight (N, K) with one launch configuration (the benchmark sweeps
    them) -> (M, N) in x's dtype."""
    M, K = x_MK.shape
    N = weight_NK.shape[0]
    y = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    with on_device(x_MK):
        _matvec_kernel[(triton.cdiv(N, block_n),)](x_MK, weight_NK, y, M, N, K, M_P2=triton.next_power_of_2(M),
                                                   BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


if triton is not None:
    @triton.jit
    def _matvec_kernel(X, W, Y, M, N, K, M_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Y (M, N) = X (M, K) W (N, K)^T: this program's BLOCK_N weight rows, read once in BLOCK_K columns,
        against all M (<= M_P2) rows of X, in float32. Each lane keeps its own column's partial sums through the
        loop (no cross-lane reduction per step: the loop is loads and FMAs), reduced across lanes once."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, M_P2)
        acc = tl.zeros((M_P2, BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(W + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
            x = tl.load(X + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            acc += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
        y = tl.sum(acc, axis=2)
        tl.store(Y + m[:, None] * N + n[None, :], y.to(Y.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))

    @torch.library.custom_op("tessera::linear_few_rows", mutates_args=())
    def _linear_few_rows_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()     # no copies as the step calls it
        if not int32_offsets(x, weight):
            return torch.nn.functional.linear(x, weight)
        return launch(x, weight, *LAUNCH)

    @_linear_few_rows_op.register_fake
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])
