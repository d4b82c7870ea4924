"""SwiGLU's gate/up projection and its silu(gate) * up in one Triton matmul, for no-grad forwards (the masked
sampler's 16 forwards per image).

``fused_swiglu(x, weight)`` = ``silu(x Wg^T) * (x Wu^T)`` for ``weight`` = ``SwiGLU.gate_up.weight`` (2 Hd, D):
rows [0, Hd) are the gate Wg, rows [Hd, 2 Hd) the up branch Wu. Letters: M rows (tokens), D = K the input
width, Hd = N the hidden width. Each program computes a BM x BN tile of the gate AND the matching tile of
up, with two float32 accumulators fed by the same x tile (two ``tl.dot`` per K step); the epilogue rounds
each to the input dtype (what cuBLAS's bf16 gate_up output holds), then computes g sigmoid(g) u in float32
and rounds once, as inductor's fused silu*up kernel does on that output. Programs run in GROUP_M-row
groups of tiles, so the weight tiles of a group stay in L2. ``SwiGLU`` calls it where ``use_kernel`` holds
(opted in with ``ENABLED``, CUDA, no autograd) and runs the torch ops everywhere else. Off by default: measured
slower (H200, session 11, ``python3 -m benchmarks.swiglu``: 0.46 ms per masked-B layer-step against 0.40 for
cuBLAS + inductor's silu*up; its matmul runs at 75% of cuBLAS's speed, and needs ~85% to win). TESSERA_FUSED_SWIGLU=1
turns it on.

Why a kernel (benchmarks/NOTES.md A31, the prediction): in masked-B sampling (M = 128 x 257 = 32896 rows,
D 768, Hd 2048) cuBLAS writes the (M, 2 Hd) bf16 gate_up output (270 MB) and inductor's silu*up kernel
reads it back to write (M, Hd): ~0.09 ms per layer-step, ~18 ms of a ~271 ms batch on an H200. Here the
(M, 2 Hd) product never leaves the registers.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None

# opt-in, measured slower (NOTES A31): TESSERA_FUSED_SWIGLU=1, or set this before the first forward
ENABLED = os.environ.get("TESSERA_FUSED_SWIGLU") == "1"
DTYPES = (torch.bfloat16, torch.float16)


def fused_swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., D), gate_up weight (2 Hd, D) -> silu(x Wg^T) * (x Wu^T) (..., Hd) in the weight's dtype (x is
    cast to it, as autocast would). Only where ``use_kernel`` says."""
    x_MD = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    return torch.ops.tessera.fused_swiglu(x_MD, weight).view(*x.shape[:-1], weight.shape[0] // 2)


def use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``ENABLED``, and what the kernel covers: CUDA, Triton present, no autograd (forward only), a contiguous
    bf16/fp16 weight whose dtype is what ``F.linear`` would compute in (x's dtype, or CUDA autocast's dtype
    when autocast is on), D and Hd multiples of 16."""
    if not (ENABLED and triton is not None and x.is_cuda and not torch.is_grad_enabled()):
        return False
    if torch.is_autocast_enabled("cuda"):
        dtype_ok = torch.get_autocast_dtype("cuda") == weight.dtype and x.dtype in (torch.float32, *DTYPES)
    else:
        dtype_ok = x.dtype == weight.dtype
    N2, D = weight.shape
    return (dtype_ok and weight.dtype in DTYPES and weight.is_cuda and weight.is_contiguous()
            and x.shape[-1] == D and D % 16 == 0 and N2 % 32 == 0)


# the autotuner's candidates (BM rows, BN hidden columns of each branch, BK, warps, stages, GROUP_M); the
# first is the one the CPU interpreter runs. Two float32 (BM, BN) accumulators per program: BM BN / 128
# registers per thread at 8 warps, so 128 x 128 needs 8 warps and a 128 x 256 tile would spill; shared
# memory per stage (BM + 2 BN) BK 2 bytes, 48 KB at 128 x 128 x 64 (Hopper: up to 227 KB per block).
# The 64-row tiles are for small M (batch 1: 514 rows would fill only 80 of 132 SMs with 128 x 128 tiles)
CONFIGS = [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 128, 32, 8, 5, 8), (256, 64, 64, 8, 3, 8),
           (128, 64, 64, 4, 4, 8), (128, 64, 64, 8, 4, 8), (64, 128, 64, 4, 4, 8), (64, 64, 64, 4, 4, 8)]


def m_bucket(M: int) -> int:
    """The autotuner's key for M: its next power of two, so a new M does not time the configs again."""
    return 1 << max(M - 1, 0).bit_length()


if triton is not None:
    @triton.jit
    def _fused_swiglu_kernel(X, W, O, M, N, K, s_xm, s_om, M_BUCKET, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        """Program p: out tile rows [pid_m BM, +BM) x hidden columns [pid_n BN, +BN) (those < M, < N), p
        walking the tiles GROUP_M rows of tiles at a time, column by column. M_BUCKET only keys the autotuner."""
        DT = O.dtype.element_ty
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        first_m = pid // (GROUP_M * tiles_n) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        pid_n = (pid % (GROUP_M * tiles_n)) // group_m
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        # rows past M and columns past N load valid ones again (wrapped), so only K needs a mask; not stored
        x_ptrs = X + (rows % M).to(tl.int64)[:, None] * s_xm + ks[None, :]                  # (BM, BK)
        wg_ptrs = W + (cols % N).to(tl.int64)[None, :] * K + ks[:, None]                    # (BK, BN): Wg^T
        wu_ptrs = wg_ptrs + N * K                                                           # Wu^T
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                x = tl.load(x_ptrs)
                wg = tl.load(wg_ptrs)
                wu = tl.load(wu_ptrs)
            else:
                inside = ks < K - k0
                x = tl.load(x_ptrs, mask=inside[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=inside[:, None], other=0.0)
                wu = tl.load(wu_ptrs, mask=inside[:, None], other=0.0)
            acc_g = tl.dot(x, wg, acc=acc_g)
            acc_u = tl.dot(x, wu, acc=acc_u)
            x_ptrs += BK
            wg_ptrs += BK
            wu_ptrs += BK
        g = acc_g.to(DT).to(tl.float32)         # the bf16 matmul output that the torch path rounds to
        u = acc_u.to(DT).to(tl.float32)
        out = (g * tl.sigmoid(g) * u).to(DT)
        o_ptrs = O + rows.to(tl.int64)[:, None] * s_om + cols[None, :]
        tl.store(o_ptrs, out, mask=(rows[:, None] < M) & (cols[None, :] < N))

    _interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _tuned_kernel = triton.autotune(     # timed once per (N, K, M's power of two, dtype) in a process
        [triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm), num_warps=w, num_stages=st)
         for bm, bn, bk, w, st, gm in CONFIGS[:1 if _interpreted else None]], key=["N", "K", "M_BUCKET"],
    )(triton.heuristics(dict(EVEN_K=lambda args: args["K"] % args["BK"] == 0))(_fused_swiglu_kernel))

    def grid(M: int, N: int, BM: int, BN: int) -> tuple[int]:
        return (triton.cdiv(M, BM) * triton.cdiv(N, BN),)

    @torch.library.custom_op("tessera::fused_swiglu", mutates_args=())
    def _fused_swiglu_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        M, K = x.shape
        N = weight.shape[0] // 2
        if x.stride(1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M > 0:
            _tuned_kernel[lambda meta: grid(M, N, meta["BM"], meta["BN"])](
                x, weight, out, M, N, K, x.stride(0), out.stride(0), m_bucket(M))
        return out

    @_fused_swiglu_op.register_fake
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0] // 2)
