"""qk-norm and RoPE of a training forward as one Triton op (NOTES A63).

    n = x rstd w,  rstd = rsqrt(mean(x^2) + eps)           (RMSNorm of each head's row of q or k, float32)
    out = (n1 cos - n2 sin, n2 cos + n1 sin)               (RoPE over the halves n = (n1, n2), rounded once)

for q and k, each (B, L, H, K), read from wherever they lie (views of the qkv projection's output), written as
contiguous (B, L, H, K). The backward is the same formula's, in torch ops (``backward``): compiled, inductor fuses
it with the gradients' sums over VAR's attention groups and the stack into the qkv gradient as before, which
an opaque backward would make it store first (no fewer bytes moved).

Why a kernel: compiled, this forward was one inductor kernel per layer taking 0.45 ms at VAR-d16's batch 128
(benchmarks/qk_norm_rope.py, H100) to read q and k and write them back, 0.71 GB: 1.6 TB/s, where the kernels
around it run at ~3 TB/s. Here ~0.25 ms; the VAR-d16 step 300.6 -> 298.3 ms and 302.9 -> 298.4 ms in two runs,
masked-L and AR-L -4 to -6 ms (NOTES A63). A program takes runs of head rows; one token's heads lie side by side.
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
# (head rows a program, warps): the fastest of benchmarks/qk_norm_rope.py's sweep on an H100 at VAR-d16's batch 128
# (run 7312abfc4c69; NOTES A63), ~0.25 ms a layer; TESSERA_QK_ROPE_LAUNCH overrides it
ROWS, WARPS = env_launch_config("TESSERA_QK_ROPE_LAUNCH", (128, 4))


def use_kernel(q: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module) -> bool:
    """``ENABLED``, Triton present, q on CUDA (or the interpreter on the CPU), autograd on, RMSNorm qk-norms with
    one eps, a power-of-two head size of 16 to 128, unit stride along it, int32 offsets."""
    K = q.shape[-1]
    return (ENABLED and triton is not None and (q.is_cuda or INTERPRETED) and torch.is_grad_enabled()
            and q.dim() == 4 and K in (16, 32, 64, 128) and q.stride(-1) == 1 and int32_offsets(q)
            and all(hasattr(n, "weight") and hasattr(n, "eps") for n in (q_norm, k_norm)) and q_norm.eps == k_norm.eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos_LF: torch.Tensor, sin_LF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, L, H, K) (any strides, unit along K), the norms' weights (K,), RoPE tables (L, K/2) float32 ->
    (q', k'), contiguous (B, L, H, K) in q's dtype."""
    q_out, k_out, _ = torch.ops.tessera.qk_norm_rope(q, k, q_weight, k_weight, cos_LF, sin_LF, eps)
    return q_out, k_out


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


if triton is not None:
    @triton.jit
    def _forward_kernel(X0, X1, W0, W1, COS, SIN, O0, O1, RSTD, n_rows, L, H, s0_b, s0_l, s0_h, s1_b, s1_l, s1_h,
                        eps, F_: tl.constexpr, ROWS_: tl.constexpr):
        """Program (i, j): head rows [i ROWS, (i + 1) ROWS) of q (j = 0) or k (j = 1), a row r = (b L + l) H + h."""
        which = tl.program_id(1)
        rows = tl.program_id(0) * ROWS_ + tl.arange(0, ROWS_)
        inside = (rows < n_rows)[:, None]
        h = rows % H
        t = rows // H
        b, l = t // L, t % L
        f = tl.arange(0, F_)[None, :]
        if which == 0:
            src = X0 + (b * s0_b + l * s0_l + h * s0_h)[:, None] + f
            W, O = W0, O0
        else:
            src = X1 + (b * s1_b + l * s1_l + h * s1_h)[:, None] + f
            W, O = W1, O1
        lo = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        hi = tl.load(src + F_, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * F_) + eps)
        tl.store(RSTD + which * n_rows + rows, rstd, mask=rows < n_rows)
        lo = lo * rstd[:, None] * tl.load(W + f).to(tl.float32)
        hi = hi * rstd[:, None] * tl.load(W + F_ + f).to(tl.float32)
        table = l[:, None] * F_ + f
        cos = tl.load(COS + table, mask=inside, other=0.0)
        sin = tl.load(SIN + table, mask=inside, other=0.0)
        dst = O + rows[:, None] * (2 * F_) + f
        tl.store(dst, (lo * cos - hi * sin).to(O.dtype.element_ty), mask=inside)
        tl.store(dst + F_, (hi * cos + lo * sin).to(O.dtype.element_ty), mask=inside)

    def _forward(q, k, q_weight, k_weight, cos, sin, eps, config=None):
        """-> q', k' (B, L, H, K) contiguous, rstd (2, B, L, H) float32. ``config``: (rows, warps), default
        (ROWS, WARPS)."""
        B, L, H, K = q.shape
        q_out = torch.empty(B, L, H, K, dtype=q.dtype, device=q.device)
        k_out = torch.empty_like(q_out)
        rstd = torch.empty(2, B, L, H, dtype=torch.float32, device=q.device)
        rows, warps = config or (ROWS, WARPS)
        n = B * L * H
        with on_device(q):
            _forward_kernel[(triton.cdiv(n, rows), 2)](
                q, k, q_weight.contiguous(), k_weight.contiguous(), cos.contiguous(), sin.contiguous(), q_out, k_out,
                rstd, n, L, H, *q.stride()[:3], *k.stride()[:3], eps, F_=K // 2, ROWS_=rows,
                num_warps=1 if INTERPRETED else warps)
        return q_out, k_out, rstd

    @torch.library.custom_op("tessera::qk_norm_rope", mutates_args=())
    def _op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k.shape != q.shape or cos.shape != (q.shape[1], q.shape[-1] // 2) or sin.shape != cos.shape:
            raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must match, and the RoPE "
                             f"tables {tuple(cos.shape)} / {tuple(sin.shape)} be (L, K/2)")
        return _forward(q, k, q_weight, k_weight, cos, sin, eps)

    @_op.register_fake
    def _(q, k, q_weight, k_weight, cos, sin, eps):
        B, L, H, K = q.shape
        return (q.new_empty(B, L, H, K), k.new_empty(B, L, H, K), q.new_empty(2, B, L, H, dtype=torch.float32))

    def _save(ctx, inputs, output):
        q, k, q_weight, k_weight, cos, sin, eps = inputs
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[2])

    def _grad(ctx, dq_out, dk_out, _drstd):
        q, k, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
        dq, dq_weight = backward(dq_out, q, q_weight, rstd[0], cos, sin)
        dk, dk_weight = backward(dk_out, k, k_weight, rstd[1], cos, sin)
        return dq, dk, dq_weight, dk_weight, None, None, None

    torch.library.register_autograd("tessera::qk_norm_rope", _grad, setup_context=_save)
