"""Linear layers on a few rows (a cached decoding step) as one Triton mat-vec, with the pre-norm block's work
around them fused in.

``linear_few_rows(x, weight, norm_weight=, glu=, residual=)`` = ``residual + F.linear(f(x), weight)`` for x of at
most ``MAX_ROWS`` rows, the product in the weight's dtype (its input cast to it, as autocast would), where f is

- nothing (the attention's output projection),
- an RMSNorm with ``norm_weight`` (the qkv and gate_up projections of a pre-norm block: ``transformer.RMSNorm``'s
  float32 formula, its result rounded to the weight's dtype),
- ``silu(gate) * up`` over x's two halves (``glu``: the MLP's down projection of SwiGLU's gate_up output, in
  float32 and rounded once, as the compiled step's fused kernel does),

and ``residual`` (optional) is added to the rounded product in float32, stored in their promoted dtype. Program p
reads weight rows [p BLOCK_N, (p + 1) BLOCK_N) once against every row of x, in float32: in one pass where BLOCK_K
covers K (its whole weight slab loaded first; AR-B's shapes), else BLOCK_K columns at a time, each lane keeping its
own partial sums through the loop, reduced across lanes once at the end. With a norm every program first sums the
squares of x's rows (a few KB, from L2). On Hopper it launches with PDL (``launch.pdl_launch``, NOTES A57): the
weight slab, which no kernel writes, is loaded while the kernel before it still runs; x and the residual after.

Why (benchmarks/NOTES.md A49, A52): at batch 1 with CFG each Linear of an AR step runs on M = 2 rows, a read of
its weight that takes a few microseconds, latency-bound, and an AR-B token is ~110 kernels, each paying its
launch gap inside the step's CUDA graph. With cold weights, as a step reads them, the mat-vec beats cuBLAS at AR-B's
proj and down (3.9 -> 2.7 and 5.7 -> 4.3 us, H100, NOTES A57) and is a little slower at qkv (4.2 -> 4.8) and
gate_up (5.0 -> 5.9) with the RMSNorm inside it, which cuBLAS would need a kernel of its own for; the head (16384
outputs) stays with cuBLAS (``MAX_WIDEN``). Fusing the norms, SwiGLU's activation and the residual adds into the
four mat-vecs removes three of a block's nine kernels (A52).

On by default (measured end to end, NOTES A52; job ``sample-ar-cublas`` runs the same rows without it);
TESSERA_MATVEC=0 turns it off. A different sum order from cuBLAS's: equal to bf16 rounding, which can move a late
token of a sampled sequence.
``launch_config`` is set from ``python3 -m benchmarks.decode_matvec``, which sweeps this kernel on cold weights.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from generator.launch import gdc_launch_dependents, gdc_wait, int32_offsets, linear_in_half, on_device, pdl_kwargs

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: F.linear
    triton = None

ENABLED = os.environ.get("TESSERA_MATVEC", "1") != "0"
MAX_ROWS = 8              # batch 1-4 under CFG; past a few rows cuBLAS's tiles use the weight reads well
MAX_WIDEN = 6             # outputs per input: AR-B's gate_up (5.3x) takes the kernel, the head (21x) cuBLAS


def launch_config(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N weight rows per program, BLOCK_K columns per step, warps) for a (N, K) weight: one pass over K's
    power of two up to 2048 columns (then 2048 at a time), 2 rows a program where N <= K (else 4), 2 warps (4 past
    1024 columns). From ``benchmarks/decode_matvec``'s sweep with cold weights (H100, session 29, NOTES A57: a
    decoding step streams 170 MB of AR-B weights through a 50 MB L2), us per call vs session 25's launches: proj
    (2, 1024, 2) 2.7 vs 3.4, down (2, 2048, 4) 4.3 vs 5.6, qkv (4, 1024, 2) 4.8 vs 5.3. gate_up takes one pass
    too, (4, 1024, 2), for its weight load ahead of the wait under PDL, where the sweep alone (no PDL) put
    (4, 512, 2) first at 5.9 us and no one-pass launch in its best three (>= 6.3)."""
    block_k = min(1 << (K - 1).bit_length(), 2048)
    return (2 if N <= K else 4), block_k, (2 if block_k <= 1024 else 4)


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                    eps: float = 1e-6, glu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(f(x), weight)`` (module docstring) for x (..., K), or (..., 2K) with ``glu``, of at
    most ``MAX_ROWS`` rows and residual (..., N). Only where ``use_kernel`` says (or on Triton's CPU interpreter,
    in tests)."""
    lead, N = x.shape[:-1], weight.shape[0]
    x_MK = x.reshape(-1, x.shape[-1])
    if norm_weight is None and not glu:
        x_MK = x_MK.to(weight.dtype)     # as autocast casts it; a norm or an activation reads x as it is
    r_MN = None if residual is None else residual.reshape(-1, N)
    return torch.ops.tessera.linear_few_rows(x_MK, weight, norm_weight, eps, glu, r_MN).view(*lead, N)


def few_rows_reference(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                       eps: float = 1e-6, glu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's maths in torch ops (the op's path past int32 offsets, and the tests' formula)."""
    if glu:
        gate, up = x.float().chunk(2, dim=-1)
        x = F.silu(gate) * up
    elif norm_weight is not None:
        xf = x.float()
        x = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = F.linear(x.to(weight.dtype), weight)
    return y if residual is None else residual + y


def use_kernel(x: torch.Tensor, weight: torch.Tensor, glu: bool = False) -> bool:
    """``ENABLED``, CUDA, Triton present, no autograd (forward only), a bf16/fp16 weight whose dtype is what
    ``F.linear`` computes in (x's, or CUDA autocast's), and the shapes of ``few_rows``."""
    if not (ENABLED and triton is not None and x.is_cuda and weight.is_cuda and not torch.is_grad_enabled()):
        return False
    return linear_in_half(x, weight) and few_rows(x, weight, glu)


def few_rows(x: torch.Tensor, weight: torch.Tensor, glu: bool = False) -> bool:
    """What the kernel covers and wins at: one new token per sequence, x (B, 1, K) (with ``glu`` (B, 1, 2K)), of
    at most ``MAX_ROWS`` rows, a contiguous weight (N, K) and at most ``MAX_WIDEN`` outputs per input. The
    one-token test comes first: a compiled forward over a dynamic number of tokens (VAR's scales after the first)
    decides it without a guard (dynamic sizes are >= 2), where a row count would specialise its graph."""
    N, K = weight.shape
    width = 2 * K if glu else K
    return (x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_ROWS and x.shape[2] == width
            and weight.is_contiguous() and N <= MAX_WIDEN * K)


def launch(x_MK: torch.Tensor, weight_NK: torch.Tensor, block_n: int, block_k: int, warps: int,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, glu: bool = False,
           residual_MN: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel on contiguous x (M, K) (or (M, 2K) with ``glu``), weight (N, K) and residual (M, N), with one
    launch configuration (the benchmark sweeps them) -> (M, N) in the weight's dtype, or with a residual in its
    promoted dtype with the weight's."""
    M, N, K = x_MK.shape[0], weight_NK.shape[0], weight_NK.shape[1]
    out_dtype = weight_NK.dtype if residual_MN is None else torch.promote_types(residual_MN.dtype, weight_NK.dtype)
    y = torch.empty(M, N, dtype=out_dtype, device=x_MK.device)
    with on_device(x_MK):
        _matvec_kernel[(triton.cdiv(N, block_n),)](
            x_MK, weight_NK, y, x_MK if norm_weight is None else norm_weight, y if residual_MN is None else residual_MN,
            M, N, K, eps, M_P2=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k,
            NORM=norm_weight is not None, GLU=glu, RESIDUAL=residual_MN is not None, ONE_PASS=block_k >= K,
            num_warps=warps, **pdl_kwargs(x_MK))
    return y


if triton is not None:
    @triton.jit
    def _input_block(X, G, m, k, row, M, K, rstd, NORM: tl.constexpr, GLU: tl.constexpr, OUT: tl.constexpr):
        """Columns k of f(X)'s rows m as the product takes them: float32, rounded to OUT (the weight's dtype)
        where f computes (RMSNorm with weight G and the rows' ``rstd``; or silu(gate) * up)."""
        x_mask = (m[:, None] < M) & (k[None, :] < K)
        x = tl.load(X + m[:, None] * row + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if GLU:
            up = tl.load(X + m[:, None] * row + K + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            x = (x * tl.sigmoid(x) * up).to(OUT).to(tl.float32)
        if NORM:
            g = tl.load(G + k, mask=k < K, other=0.0).to(tl.float32)
            x = (x * rstd[:, None] * g[None, :]).to(OUT).to(tl.float32)
        return x

    @triton.jit
    def _matvec_kernel(X, W, Y, G, R, M, N, K, eps, M_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                       ONE_PASS: tl.constexpr, PDL: tl.constexpr,
                       TRIGGER_FIRST: tl.constexpr):
        """Y (M, N) = R + f(X) W (N, K)^T: this program's BLOCK_N weight rows against all M (<= M_P2) rows of f(X)
        (rounded to W's dtype), in float32; f = RMSNorm with weight G (NORM), silu(gate) * up over X's halves
        (GLU: rows of 2K), or nothing. ONE_PASS (BLOCK_K >= K): the program's whole weight slab is loaded first,
        before x and its norm, so the step's read from HBM is in flight at once; launched with PDL, while the
        kernel before it runs (X, R come from it: they are read after ``gdc_wait``). Otherwise BLOCK_K columns at a
        time, each lane keeping its own column's partial sums through the loop, reduced across lanes once."""
        if PDL and TRIGGER_FIRST:       # the next kernel may start (it too waits before it reads what this writes)
            gdc_launch_dependents()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, M_P2)
        row = 2 * K if GLU else K
        out_dtype = W.dtype.element_ty
        if ONE_PASS:
            k = tl.arange(0, BLOCK_K)
            w = tl.load(W + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        if PDL:       # the kernel before has ended (its writes visible): read its output
            gdc_wait()
            if not TRIGGER_FIRST:
                gdc_launch_dependents()
        rstd = tl.zeros((M_P2,), tl.float32)
        if NORM:      # the rows' mean squares first, as RMSNorm does before it scales
            ss = tl.zeros((M_P2, BLOCK_K), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + m[:, None] * row + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
                ss += x.to(tl.float32) * x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)
        if ONE_PASS:
            k = tl.arange(0, BLOCK_K)
            x = _input_block(X, G, m, k, row, M, K, rstd, NORM, GLU, out_dtype)
            y = tl.sum(x[:, None, :] * w[None, :, :].to(tl.float32), axis=2)
        else:
            acc = tl.zeros((M_P2, BLOCK_N, BLOCK_K), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(W + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
                x = _input_block(X, G, m, k, row, M, K, rstd, NORM, GLU, out_dtype)
                acc += x[:, None, :] * w[None, :, :].to(tl.float32)
            y = tl.sum(acc, axis=2)
        out_mask = (m[:, None] < M) & (n[None, :] < N)
        if RESIDUAL:   # the product rounded to W's dtype (what F.linear returns), then the add in float32
            r = tl.load(R + m[:, None] * N + n[None, :], mask=out_mask, other=0.0).to(tl.float32)
            y = y.to(out_dtype).to(tl.float32) + r
        tl.store(Y + m[:, None] * N + n[None, :], y.to(Y.dtype.element_ty), mask=out_mask)

    @torch.library.custom_op("tessera::linear_few_rows", mutates_args=())
    def _linear_few_rows_op(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                            glu: bool, residual: torch.Tensor | None) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()     # no copies as the step calls it
        residual = None if residual is None else residual.contiguous()
        if not int32_offsets(x, weight):
            return few_rows_reference(x, weight, norm_weight, eps, glu, residual)
        return launch(x, weight, *launch_config(*weight.shape), norm_weight=norm_weight, eps=eps, glu=glu,
                      residual_MN=residual)

    @_linear_few_rows_op.register_fake
    def _(x, weight, norm_weight, eps, glu, residual):
        dtype = weight.dtype if residual is None else torch.promote_types(residual.dtype, weight.dtype)
        return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype)
