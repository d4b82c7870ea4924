"""Full (bidirectional) attention straight from the fused qkv projection: qk-norm, RoPE and attention
in one kernel, for no-grad forwards (the masked sampler's 16 forwards per image).

``fused_attention(qkv, q_norm, k_norm, cos, sin)`` = ``transformer.Attention``'s torch path without a
mask or a cache: q, k = RoPE(RMSNorm(q)), RoPE(RMSNorm(k)) (each rounded to the input dtype where the
torch path rounds), then softmax(q k^T / sqrt(K)) v, returned as (B, L, H K) for the output projection.
One Triton program per (query tile, batch x head) normalises and rotates its queries, then streams the
keys and values of its head with an online softmax in float32 (P rounded to the input dtype for P V, as
flash attention does), normalising and rotating each key tile as it loads it. ``Attention`` calls it
where ``use_kernel`` holds (opted in with ``ENABLED``, CUDA, no autograd) and runs the torch ops
everywhere else. Not measured on a GPU yet, so it is off by default (TESSERA_FUSED_ATTENTION=1 turns it
on; ``python3 -m benchmarks.attention_backends fused`` and the ``sample-masked-fused-attn`` job measure it).

Why a kernel (benchmarks/NOTES.md A29, the prediction): in masked-B sampling (128 sequences of 1 + 256
tokens) cuDNN's attention took 0.19-0.20 ms per call, of which about half is the class token's 257th row and column
(a third 128-wide tile; 0.10-0.13 ms at 256 tokens), and the qk-norm/RoPE kernel before it another
~0.09 ms (it writes q and k back to memory for the attention to read again). Here the L mod 16
leading rows (the class token) are a 16-wide block of their own, keys and queries alike, so the grid's
256 rows tile exactly, and q and k never leave the kernel.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None

PREFIX_BLOCK = 16       # the leading L mod 16 rows (the class token) go in one block of this many
# opt-in until measured on a GPU (NOTES A29): TESSERA_FUSED_ATTENTION=1, or set this before the first forward
ENABLED = os.environ.get("TESSERA_FUSED_ATTENTION") == "1"


def fused_attention(qkv_BL3HK: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module,
                    cos_LF: torch.Tensor, sin_LF: torch.Tensor) -> torch.Tensor:
    """qkv (B, L, 3, H, K) (the projection's output, viewed), the qk-norms (``RMSNorm`` or ``nn.Identity``),
    RoPE tables (L, K/2) -> attention output (B, L, H K) in qkv's dtype. Only where ``use_kernel`` says."""
    q_weight, k_weight, eps = norm_weights(q_norm, k_norm, qkv_BL3HK.device)
    return torch.ops.tessera.fused_attention(qkv_BL3HK, q_weight, k_weight, cos_LF, sin_LF, eps)


def norm_weights(q_norm: nn.Module, k_norm: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(q weight, k weight, eps) for the kernel; without qk-norm, empty weights and eps < 0 (the kernel
    then skips the normalisation)."""
    if isinstance(q_norm, nn.Identity):
        empty = torch.empty(0, device=device)
        return empty, empty, -1.0
    return q_norm.weight, k_norm.weight, q_norm.eps


def use_kernel(qkv: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module) -> bool:
    """``ENABLED``, and what the kernel covers: CUDA, Triton present, no autograd (forward only), bf16/fp16
    activations, a power-of-two head size of 32 to 128, unit stride along the head dimension, both
    qk-norms RMSNorm with the same eps or both absent."""
    K = qkv.shape[-1]
    norms = ((isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity))
             or (hasattr(q_norm, "weight") and hasattr(k_norm, "weight") and q_norm.eps == k_norm.eps))
    return (ENABLED and triton is not None and qkv.is_cuda and not torch.is_grad_enabled() and norms
            and qkv.dtype in (torch.bfloat16, torch.float16) and K in (32, 64, 128) and qkv.stride(-1) == 1)


# the autotuner's candidates (query rows per program, key rows per loop step, warps, stages); the first
# is the one the CPU interpreter runs. 256 rows: one program per head at 256 grid tokens, so each key
# tile is normalised and rotated once instead of once per query tile (if its registers do not spill)
CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 2), (128, 32, 4, 2),
           (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (256, 64, 8, 2)]


if triton is not None:
    @triton.jit
    def _norm_rope(lo, hi, W, COS, SIN, rows, inside, f, eps, NORM: tl.constexpr, DT: tl.constexpr,
                   F_: tl.constexpr):
        """RMSNorm (float32, rounded to DT as the torch path returns it) then RoPE (GPT-NeoX halves, float32,
        rounded to DT) of a tile given as its two halves (rows, K/2) -> the rotated halves in DT."""
        if NORM:
            r = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * F_) + eps)
            lo = (lo * r[:, None] * tl.load(W + f).to(tl.float32)[None, :]).to(DT).to(tl.float32)
            hi = (hi * r[:, None] * tl.load(W + F_ + f).to(tl.float32)[None, :]).to(DT).to(tl.float32)
        cos = tl.load(COS + rows[:, None] * F_ + f[None, :], mask=inside[:, None], other=1.0).to(tl.float32)
        sin = tl.load(SIN + rows[:, None] * F_ + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        return (lo * cos - hi * sin).to(DT), (hi * cos + lo * sin).to(DT)

    @triton.jit
    def _attend_block(q_lo, q_hi, m_i, l_i, acc, K_ptr, V_ptr, KW, COS, SIN, start, end, s_l, eps, scale,
                      NORM: tl.constexpr, DT: tl.constexpr, F_: tl.constexpr, BN: tl.constexpr):
        """One online-softmax step over key rows [start, start + BN) (those < end visible)."""
        f = tl.arange(0, F_)
        rows = start + tl.arange(0, BN)
        inside = rows < end
        k_lo = tl.load(K_ptr + rows[:, None] * s_l + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        k_hi = tl.load(K_ptr + rows[:, None] * s_l + F_ + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        k_lo, k_hi = _norm_rope(k_lo, k_hi, KW, COS, SIN, rows, inside, f, eps, NORM, DT, F_)
        s = (tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))) * scale     # log2 units
        s = tl.where(inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))       # finite: every block has a visible key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(V_ptr + rows[:, None] * s_l + tl.arange(0, 2 * F_)[None, :], mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _fused_attention_kernel(QKV, QW, KW, COS, SIN, O, L, P, row_start, row_end, s_b, s_l, so_b, so_l, eps,
                                scale, H: tl.constexpr, K: tl.constexpr, F_: tl.constexpr, NORM: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr):
        """Program (i, b * H + h): query rows [row_start + i BM, +BM) (those < row_end) of head h against
        every key: the P leading keys as one 16-wide block (when P > 0), then [P, L) in blocks of BN."""
        DT = QKV.dtype.element_ty
        b, h = tl.program_id(1) // H, tl.program_id(1) % H
        f = tl.arange(0, F_)
        rows = row_start + tl.program_id(0) * BM + tl.arange(0, BM)
        inside = rows < row_end
        Q_ptr = QKV + b * s_b + h * K
        K_ptr, V_ptr = Q_ptr + H * K, Q_ptr + 2 * H * K
        q_lo = tl.load(Q_ptr + rows[:, None] * s_l + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        q_hi = tl.load(Q_ptr + rows[:, None] * s_l + F_ + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        q_lo, q_hi = _norm_rope(q_lo, q_hi, QW, COS, SIN, rows, inside, f, eps, NORM, DT, F_)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, K], tl.float32)
        if P > 0:
            m_i, l_i, acc = _attend_block(q_lo, q_hi, m_i, l_i, acc, K_ptr, V_ptr, KW, COS, SIN, 0, P, s_l, eps,
                                          scale, NORM, DT, F_, 16)      # 16 = PREFIX_BLOCK
        for start in range(P, L, BN):
            m_i, l_i, acc = _attend_block(q_lo, q_hi, m_i, l_i, acc, K_ptr, V_ptr, KW, COS, SIN, start, L, s_l, eps,
                                          scale, NORM, DT, F_, BN)
        out = (acc / l_i[:, None]).to(DT)
        tl.store(O + b * so_b + rows[:, None] * so_l + h * K + tl.arange(0, K)[None, :], out, mask=inside[:, None])

    _interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _tuned_kernel = triton.autotune(     # timed once per (L, H, K) in a process, at the first call
        [triton.Config(dict(BM=bm, BN=bn), num_warps=w, num_stages=st)
         for bm, bn, w, st in CONFIGS[:1 if _interpreted else None]], key=["L", "H", "K"])(_fused_attention_kernel)

    @torch.library.custom_op("tessera::fused_attention", mutates_args=())
    def _fused_attention_op(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, eps: float) -> torch.Tensor:
        B, L, _, H, K = qkv.shape
        if qkv.stride()[2:] != (H * K, K, 1):      # q, k, v and the heads side by side in each token's row
            qkv = qkv.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        out = torch.empty(B, L, H * K, dtype=qkv.dtype, device=qkv.device)
        P = L % PREFIX_BLOCK
        args = (qkv, q_weight, k_weight, cos, sin, out, L, P)
        rest = (qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), eps, K ** -0.5 * 1.4426950408889634)
        consts = dict(H=H, K=K, F_=K // 2, NORM=eps >= 0)
        _tuned_kernel[lambda meta: (triton.cdiv(L - P, meta["BM"]), B * H)](*args, P, L, *rest, **consts)
        if P > 0:      # the leading rows' queries: one 16-row tile per head
            _fused_attention_kernel[(1, B * H)](*args, 0, P, *rest, **consts, BM=PREFIX_BLOCK, BN=64, num_warps=4)
        return out

    @_fused_attention_op.register_fake
    def _(qkv, q_weight, k_weight, cos, sin, eps):
        B, L, _, H, K = qkv.shape
        return qkv.new_empty(B, L, H * K)
