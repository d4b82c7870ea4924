"""qk-norm and RoPE of a training forward as one Triton op from the qkv projection's output (NOTES A63, A66).

    n = x rstd w,  rstd = rsqrt(mean(x^2) + eps)           (RMSNorm of each head's row of q or k, float32)
    out = (n1 cos - n2 sin, n2 cos + n1 sin)               (RoPE over the halves n = (n1, n2), rounded once)

for q and k, read from the (B, L, 3, H, K) projection output (any strides, unit along K), written as contiguous
(B, L, H, K); v passes through as a contiguous copy, so that the backward op gets all three gradients and writes
the qkv gradient whole: per head row it rotates q's or k's gradient back, applies RMSNorm's backward with the
saved rstd and stores the result in the qkv gradient's slot, never storing RoPE's float32 gradient in between;
v's rows are copied into theirs. The torch ops (``backward``, then a stack) are the formula it is tested against
and the path when ``BACKWARD_KERNEL`` is off.

Why kernels: compiled, the forward was one inductor kernel per layer taking 0.45 ms at VAR-d16's batch 128
(benchmarks/qk_norm_rope.py, H100) to read q and k and write them back, 0.71 GB: 1.6 TB/s, where the kernels
around it run at ~3 TB/s; as this op ~0.25 ms (VAR-d16's step 300.6 -> 298.3 ms, NOTES A63). Inductor's
backward ran RoPE's backward as its own kernel writing float32 halves (0.42 ms a layer for q and k at VAR-d16's
batch 128), then each norm's backward over them (2 x 0.24 ms); the backward op reads each gradient and input once
and writes the qkv gradient once (NOTES A66). A program takes runs of head rows; one token's heads lie side by side.
Rounding: like the compiled torch path (torch 2.11 drops the bf16 rounding between the norm and RoPE), so it
matches that within float32 reassociation; the eager torch path rounds n to bf16 first.

``Attention`` calls it where ``use_kernel`` holds: ``ENABLED``, Triton, CUDA (or the CPU interpreter), autograd on
(training and scoring with grad; sampling keeps its compiled torch ops and ids), both qk-norms RMSNorm with one eps,
a power-of-two head size of 16 to 128.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from generator.launch import INTERPRETED, env_launch_config, int32_offsets, on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None

# TESSERA_FUSED_QK_ROPE=0 turns it off (the torch ops, compiled by inductor)
ENABLED = os.environ.get("TESSERA_FUSED_QK_ROPE", "1") != "0"
# TESSERA_QK_ROPE_BACKWARD=0: the op's backward in torch ops (inductor's kernels) instead of the backward kernel. AOT
# autograd's cache keys a compiled step on its forward graph, which this switch leaves alone: with that cache on, a
# compile may get the other backward from disk (the same values to rounding); benchmarks turn the cache off
BACKWARD_KERNEL = os.environ.get("TESSERA_QK_ROPE_BACKWARD", "1") != "0"
# (head rows a program, warps): the fastest of benchmarks/qk_norm_rope.py's sweep on an H100 at VAR-d16's batch 128
# (run 7312abfc4c69; NOTES A63), ~0.25 ms a layer; TESSERA_QK_ROPE_LAUNCH overrides it
ROWS, WARPS = env_launch_config("TESSERA_QK_ROPE_LAUNCH", (128, 4))
# the backward's (head rows a program, warps): the fastest of benchmarks/qk_norm_rope.py's 12 launches in two H100 runs
# of session 34 (0.54 ms at VAR-d16's batch 128, 2.7 TB/s; NOTES A66); TESSERA_QK_ROPE_BACKWARD_LAUNCH overrides it
BACKWARD_ROWS, BACKWARD_WARPS = env_launch_config("TESSERA_QK_ROPE_BACKWARD_LAUNCH", (64, 4))


def use_kernel(qkv: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module) -> bool:
    """``ENABLED``, Triton present, qkv (B, L, 3, H, K) on CUDA (or the interpreter on the CPU), autograd on,
    RMSNorm qk-norms with one eps, a power-of-two head size of 16 to 128, unit stride along it, int32 offsets."""
    K = qkv.shape[-1]
    return (ENABLED and triton is not None and (qkv.is_cuda or INTERPRETED) and torch.is_grad_enabled()
            and qkv.dim() == 5 and qkv.shape[2] == 3 and K in (16, 32, 64, 128) and qkv.stride(-1) == 1
            and int32_offsets(qkv)
            and all(hasattr(n, "weight") and hasattr(n, "eps") for n in (q_norm, k_norm)) and q_norm.eps == k_norm.eps)


def qkv_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                  cos_LF: torch.Tensor, sin_LF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, L, 3, H, K) (any strides, unit along K), the norms' weights (K,), RoPE tables (L, K/2) float32 ->
    (q', k', v), each contiguous (B, L, H, K) in qkv's dtype."""
    q_out, k_out, v_out, _ = torch.ops.tessera.qkv_norm_rope(qkv, q_weight, k_weight, cos_LF, sin_LF, eps)
    return q_out, k_out, v_out


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, cos_LF: torch.Tensor,
              sin_LF: torch.Tensor) -> torch.Tensor:
    """One of q or k through the formula in torch ops (float32, rounded once): the kernel's test oracle."""
    xf = x.float()
    n1, n2 = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).chunk(2, dim=-1)
    cos, sin = cos_LF[:, None], sin_LF[:, None]
    return torch.cat([n1 * cos - n2 * sin, n2 * cos + n1 * sin], dim=-1).to(x.dtype)


def backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, cos_LF: torch.Tensor,
             sin_LF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of one of q or k from the gradient of its output; rstd (B, L, H) from the forward. RoPE's
    backward is the rotation by the opposite angles; then RMSNorm's, with n = x rstd and t = dn w:
    dx = rstd (t - n mean(t n)), dweight = sum dn n."""
    g1, g2 = grad.float().chunk(2, dim=-1)
    cos, sin = cos_LF[:, None], sin_LF[:, None]
    dn = torch.cat([g1 * cos + g2 * sin, g2 * cos - g1 * sin], dim=-1)
    r = rstd[..., None]
    n = x.float() * r
    t = dn * weight.float()
    dx = r * (t - n * (t * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dn * n).sum(dim=(0, 1, 2)).to(weight.dtype)


def backward_torch(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, rstd):
    """The backward op's (dqkv, dq_weight, dk_weight) in torch ops: ``backward`` for q and k, stacked with dv."""
    dq, dq_weight = backward(dq, qkv[:, :, 0], q_weight, rstd[0], cos, sin)
    dk, dk_weight = backward(dk, qkv[:, :, 1], k_weight, rstd[1], cos, sin)
    return torch.stack([dq, dk, dv.to(qkv.dtype)], dim=2), dq_weight, dk_weight


if triton is not None:
    @triton.jit
    def _head_rows(n_rows, L, H, F_: tl.constexpr, ROWS_: tl.constexpr):
        """Program i's head rows r in [i ROWS, (i + 1) ROWS), r = (b L + l) H + h = t H + h: (rows, which lie
        inside n_rows as a column, b, l, t, h, the column offsets of a half row (1, F))."""
        rows = tl.program_id(0) * ROWS_ + tl.arange(0, ROWS_)
        h = rows % H
        t = rows // H
        return rows, (rows < n_rows)[:, None], t // L, t % L, t, h, tl.arange(0, F_)[None, :]

    @triton.jit
    def _qkv_forward_kernel(X, W0, W1, COS, SIN, O0, O1, O2, RSTD, n_rows, L, H, s_b, s_l, s_3, s_h, eps,
                            F_: tl.constexpr, ROWS_: tl.constexpr):
        """Program (i, j): head rows [i ROWS, (i + 1) ROWS) of q (j = 0), k (1) or v (2); a row r = (b L + l) H + h."""
        which = tl.program_id(1)
        rows, inside, b, l, t, h, f = _head_rows(n_rows, L, H, F_, ROWS_)
        src = X + (b * s_b + l * s_l + which * s_3 + h * s_h)[:, None] + f
        out = rows[:, None] * (2 * F_) + f
        if which == 2:                                   # v: a copy
            tl.store(O2 + out, tl.load(src, mask=inside, other=0.0), mask=inside)
            tl.store(O2 + out + F_, tl.load(src + F_, mask=inside, other=0.0), mask=inside)
        else:
            if which == 0:
                W, O = W0, O0
            else:
                W, O = W1, O1
            lo = tl.load(src, mask=inside, other=0.0).to(tl.float32)
            hi = tl.load(src + F_, mask=inside, other=0.0).to(tl.float32)
            rstd = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * F_) + eps)
            tl.store(RSTD + which * n_rows + rows, rstd, mask=rows < n_rows)
            n1 = lo * rstd[:, None] * tl.load(W + f).to(tl.float32)
            n2 = hi * rstd[:, None] * tl.load(W + F_ + f).to(tl.float32)
            table = l[:, None] * F_ + f
            cos = tl.load(COS + table, mask=inside, other=0.0)
            sin = tl.load(SIN + table, mask=inside, other=0.0)
            tl.store(O + out, (n1 * cos - n2 * sin).to(O.dtype.element_ty), mask=inside)
            tl.store(O + out + F_, (n2 * cos + n1 * sin).to(O.dtype.element_ty), mask=inside)

    @triton.jit
    def _qkv_backward_kernel(G0, G1, G2, X, W0, W1, COS, SIN, RSTD, DX, PART, n_rows, L, H,
                             g0_b, g0_l, g0_h, g1_b, g1_l, g1_h, g2_b, g2_l, g2_h, s_b, s_l, s_3, s_h,
                             F_: tl.constexpr, ROWS_: tl.constexpr):
        """Program (i, j): head rows [i ROWS, (i + 1) ROWS) of q's (j = 0), k's (1) or v's (2) gradient into the
        qkv gradient DX (B, L, 3, H, K), contiguous; q and k also write their rows' sums of dn n into PART[j, i]."""
        which = tl.program_id(1)
        rows, inside, b, l, t, h, f = _head_rows(n_rows, L, H, F_, ROWS_)
        dst = DX + (t * (3 * H) + which * H + h)[:, None] * (2 * F_) + f
        if which == 2:                                   # v: its gradient as it came
            dv = G2 + (b * g2_b + l * g2_l + h * g2_h)[:, None] + f
            tl.store(dst, tl.load(dv, mask=inside, other=0.0).to(DX.dtype.element_ty), mask=inside)
            tl.store(dst + F_, tl.load(dv + F_, mask=inside, other=0.0).to(DX.dtype.element_ty), mask=inside)
        else:
            if which == 0:
                grad = G0 + (b * g0_b + l * g0_l + h * g0_h)[:, None] + f
                W = W0
            else:
                grad = G1 + (b * g1_b + l * g1_l + h * g1_h)[:, None] + f
                W = W1
            g1 = tl.load(grad, mask=inside, other=0.0).to(tl.float32)
            g2 = tl.load(grad + F_, mask=inside, other=0.0).to(tl.float32)
            table = l[:, None] * F_ + f
            cos = tl.load(COS + table, mask=inside, other=0.0)
            sin = tl.load(SIN + table, mask=inside, other=0.0)
            dn1 = g1 * cos + g2 * sin                    # RoPE's backward: the opposite rotation
            dn2 = g2 * cos - g1 * sin
            x = X + (b * s_b + l * s_l + which * s_3 + h * s_h)[:, None] + f
            r = tl.load(RSTD + which * n_rows + rows, mask=rows < n_rows, other=0.0)[:, None]
            n1 = tl.load(x, mask=inside, other=0.0).to(tl.float32) * r
            n2 = tl.load(x + F_, mask=inside, other=0.0).to(tl.float32) * r
            t1 = dn1 * tl.load(W + f).to(tl.float32)
            t2 = dn2 * tl.load(W + F_ + f).to(tl.float32)
            mean_tn = ((tl.sum(t1 * n1, axis=1) + tl.sum(t2 * n2, axis=1)) / (2 * F_))[:, None]
            tl.store(dst, (r * (t1 - n1 * mean_tn)).to(DX.dtype.element_ty), mask=inside)
            tl.store(dst + F_, (r * (t2 - n2 * mean_tn)).to(DX.dtype.element_ty), mask=inside)
            part = PART + (which * tl.num_programs(0) + tl.program_id(0)) * (2 * F_) + tl.arange(0, F_)
            tl.store(part, tl.sum(dn1 * n1, axis=0))     # rows past n_rows load zeros: they add nothing
            tl.store(part + F_, tl.sum(dn2 * n2, axis=0))

    def _forward(qkv, q_weight, k_weight, cos, sin, eps, config=None):
        """-> q', k', v' (B, L, H, K) contiguous, rstd (2, B, L, H) float32. ``config``: (rows, warps), default
        (ROWS, WARPS)."""
        B, L, _, H, K = qkv.shape
        q_out, k_out, v_out = (torch.empty(B, L, H, K, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
        rstd = torch.empty(2, B, L, H, dtype=torch.float32, device=qkv.device)
        rows, warps = config or (ROWS, WARPS)
        n = B * L * H
        with on_device(qkv):
            _qkv_forward_kernel[(triton.cdiv(n, rows), 3)](
                qkv, q_weight.contiguous(), k_weight.contiguous(), cos.contiguous(), sin.contiguous(), q_out, k_out,
                v_out, rstd, n, L, H, *qkv.stride()[:4], eps, F_=K // 2, ROWS_=rows,
                num_warps=1 if INTERPRETED else warps)
        return q_out, k_out, v_out, rstd

    def _unit_last(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    def _backward(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, rstd, config=None):
        """-> dqkv (B, L, 3, H, K) contiguous in qkv's dtype, dq_weight, dk_weight. ``config``: (rows, warps),
        default (BACKWARD_ROWS, BACKWARD_WARPS)."""
        B, L, _, H, K = qkv.shape
        dq, dk, dv = (_unit_last(g) for g in (dq, dk, dv))
        dqkv = torch.empty(B, L, 3, H, K, dtype=qkv.dtype, device=qkv.device)
        rows, warps = config or (BACKWARD_ROWS, BACKWARD_WARPS)
        n = B * L * H
        programs = triton.cdiv(n, rows)
        part = torch.empty(2, programs, K, dtype=torch.float32, device=qkv.device)
        with on_device(qkv):
            _qkv_backward_kernel[(programs, 3)](
                dq, dk, dv, qkv, q_weight.contiguous(), k_weight.contiguous(), cos.contiguous(), sin.contiguous(),
                rstd, dqkv, part, n, L, H, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                *qkv.stride()[:4], F_=K // 2, ROWS_=rows, num_warps=1 if INTERPRETED else warps)
        return dqkv, part[0].sum(0).to(q_weight.dtype), part[1].sum(0).to(k_weight.dtype)

    def _check(qkv, cos, sin):
        if qkv.dim() != 5 or qkv.shape[2] != 3 or cos.shape != (qkv.shape[1], qkv.shape[-1] // 2) \
                or sin.shape != cos.shape:
            raise ValueError(f"qkv_norm_rope: qkv {tuple(qkv.shape)} must be (B, L, 3, H, K) and the RoPE tables "
                             f"{tuple(cos.shape)} / {tuple(sin.shape)} be (L, K/2)")

    @torch.library.custom_op("tessera::qkv_norm_rope", mutates_args=())
    def _op(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check(qkv, cos, sin)
        return _forward(qkv, q_weight, k_weight, cos, sin, eps)

    @_op.register_fake
    def _(qkv, q_weight, k_weight, cos, sin, eps):
        B, L, _, H, K = qkv.shape
        return (*(qkv.new_empty(B, L, H, K) for _ in range(3)), qkv.new_empty(2, B, L, H, dtype=torch.float32))

    @torch.library.custom_op("tessera::qkv_norm_rope_backward", mutates_args=())
    def _backward_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                     q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, rstd)

    @_backward_op.register_fake
    def _(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, rstd):
        return torch.empty_like(qkv, memory_format=torch.contiguous_format), q_weight.new_empty(q_weight.shape), \
            k_weight.new_empty(k_weight.shape)

    def _save(ctx, inputs, output):
        qkv, q_weight, k_weight, cos, sin, eps = inputs
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, output[3])

    def _grad(ctx, dq_out, dk_out, dv_out, _drstd):
        qkv, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
        grads = [torch.zeros(qkv.shape[:2] + qkv.shape[3:], dtype=qkv.dtype, device=qkv.device) if g is None else g
                 for g in (dq_out, dk_out, dv_out)]
        step = torch.ops.tessera.qkv_norm_rope_backward if BACKWARD_KERNEL else backward_torch
        dqkv, dq_weight, dk_weight = step(*grads, qkv, q_weight, k_weight, cos, sin, rstd)
        return dqkv, dq_weight, dk_weight, None, None, None

    torch.library.register_autograd("tessera::qkv_norm_rope", _grad, setup_context=_save)
