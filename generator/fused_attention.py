"""Full (bidirectional) attention straight from the fused qkv projection: qk-norm, RoPE and attention
in one kernel, for no-grad forwards (the masked sampler's 16 forwards per image).

``fused_attention(qkv, q_norm, k_norm, cos, sin)`` = ``transformer.Attention``'s torch path without a
mask or a cache: q, k = RoPE(RMSNorm(q)), RoPE(RMSNorm(k)) (each rounded to the input dtype where the
torch path rounds), then softmax(q k^T / sqrt(K)) v, returned as (B, L, H K) for the output projection.
One Triton program per (query tile, batch x head) normalises and rotates its queries, then streams the
keys and values of its head with an online softmax in float32 (P rounded to the input dtype for P V, as
flash attention does); the keys come normalised and rotated from a pass of their own over each head
(or, in one candidate config, are normalised and rotated as each tile loads). ``Attention`` calls it
where ``use_kernel`` holds (``ENABLED``, CUDA, no autograd, no mask, no cache) and runs the torch ops
everywhere else. On by default since it was measured faster (TESSERA_FUSED_ATTENTION=0 turns it off;
``python3 -m benchmarks.attention_backends fused`` and the ``sample-masked-torch-attn`` job compare).

Why a kernel (benchmarks/NOTES.md A29): in masked-B sampling (128 sequences of 1 + 256 tokens, H200) cuDNN's
attention takes 0.17 ms per call on ready q and k, 0.08-0.09 ms at 256 tokens: the class token's 257th row
and column cost a third 128-wide tile. The qk-norm/RoPE kernel before it writes q and k back to memory for
the attention to read again; the compiled torch path takes 0.26-0.27 ms per call in all. Here the L mod
16 leading rows (the class token) are a 16-wide block of their own, keys and queries alike, so the grid's
256 rows tile exactly, and q never leaves the kernel: 0.19-0.20 ms per call, 262 vs 275 ms per @16 batch.

A second method, "split" (``METHOD``, TESSERA_ATTENTION_METHOD=split; NOTES A36), runs the grid rows through
cuDNN at 256 tokens (0.083 ms) and merges the class key in through the log-sum-exp: ``split_prepare`` (q and k
normalised and rotated, the grid queries' scores against the prefix keys, the prefix queries' attention per key
tile), ``split_attend`` (cuDNN with its log-sum-exp), ``split_merge`` (out = (e^lse o + sum_p e^s_p v_p) /
(e^lse + sum_p e^s_p) in float32, and the prefix rows). Off by default: measured slower in session 14 (0.226 ms
per call for its second version, whose passes ran ~3x off their bandwidth floors); the current third version is
unmeasured.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn as nn

from generator.launch import INT32_OFFSET_LIMIT, INTERPRETED, int32_offsets, on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None

PREFIX_BLOCK = 16       # the leading L mod 16 rows (the class token) go in one block of this many
# on unless TESSERA_FUSED_ATTENTION=0 (or this is set False before a forward; compiled graphs keep their choice)
ENABLED = os.environ.get("TESSERA_FUSED_ATTENTION", "1") != "0"
# "kernel": the one kernel above (A29). "split" (A36): a pass normalising and rotating q and k into (B, H, L, K)
# (and scoring the grid queries against the prefix keys), cuDNN's attention over the L - P grid rows with its
# log-sum-exp (flash's where cuDNN is off), then a pass merging the prefix keys into those rows and attending the
# prefix rows to every key. TESSERA_ATTENTION_METHOD picks one; the module attribute can be set before a forward.
METHODS = ("kernel", "split")
METHOD = os.environ.get("TESSERA_ATTENTION_METHOD", "kernel")
if METHOD not in METHODS:
    raise ValueError(f"TESSERA_ATTENTION_METHOD={METHOD!r}: expected one of {list(METHODS)}")


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
    qk-norms RMSNorm with the same eps or both absent, offsets within int32."""
    K = qkv.shape[-1]
    norms = ((isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity))
             or (hasattr(q_norm, "weight") and hasattr(k_norm, "weight") and q_norm.eps == k_norm.eps))
    return (ENABLED and triton is not None and qkv.is_cuda and not torch.is_grad_enabled() and norms
            and qkv.dtype in (torch.bfloat16, torch.float16) and K in (32, 64, 128) and qkv.stride(-1) == 1
            and int32_offsets(qkv) and qkv.numel() < INT32_OFFSET_LIMIT)   # numel: a packed copy of a view


class Config(NamedTuple):
    """One launch configuration of the attention kernel."""
    bm: int                     # query rows per program
    bn: int                     # key rows per loop step (the online softmax's order: it changes the bits)
    warps: int
    stages: int
    kpre: bool                  # keys normalised and rotated once per head by the key pass (else per tile)
    maxnreg: int | None = None  # a register cap per thread, so more programs share a multiprocessor


# Candidates for ``python3 -m benchmarks.attention_backends fused`` (the tests run the small ones on the CPU).
# Session 11, H200, masked-B, per call back to back: (128, 64, 4, 3, KPRE) 0.19 ms, (128, 64, 4, 2, KPRE) 0.20,
# (64, 64, 4, 2, KPRE) 0.24, 8 warps or 128/256-row key tiles 0.25-0.29, without KPRE 0.24. Session 13 (ncu,
# H200, Triton 3.6): (128, 64, 4, 3) uses 255 registers per thread, so 2 programs (8 warps) per multiprocessor,
# 12% occupancy, 0.57 eligible warps per scheduler: latency-bound. The register caps below let 2 programs of 8
# warps or 3-4 of 4 warps share one (Triton 3.8's ptxas here: 16-250 bytes of spills at most, or none).
CANDIDATES = [Config(128, 64, 4, 3, True), Config(128, 64, 4, 2, True), Config(64, 64, 4, 2, True),
              Config(128, 64, 4, 2, False),
              Config(128, 64, 4, 3, True, 168), Config(128, 64, 8, 3, True, 128), Config(128, 64, 8, 2, True, 128),
              Config(128, 64, 8, 4, True, 128), Config(128, 32, 4, 3, True, 168), Config(128, 32, 8, 3, True),
              Config(128, 32, 8, 2, True), Config(64, 32, 4, 3, True, 128), Config(64, 64, 4, 3, True, 128),
              # one program per head (session 21): the 256 grid rows as one tile on 8 warps, each key tile loaded and
              # (without KPRE) normalised and rotated once for all of them, so no key pass either. Measured on an H100
              # (Triton 3.6, per call back to back): 0.245-0.286 ms against the default's 0.209; the fastest
              # candidate there, (64, 32, 4, 3, KPRE, 128), 0.205 ms with other bits (BN 32)
              Config(256, 64, 8, 3, False), Config(256, 64, 8, 2, False), Config(256, 64, 8, 3, True),
              Config(256, 32, 8, 3, False)]
# One fixed config, not an autotuner's pick: the bits depend on BN (the order keys enter the online softmax)
# and the session 13 GPU test found configs differing in the last bit, so a timing-based pick could change a
# seed's ids from one process to the next. TESSERA_ATTENTION_CONFIG="bm,bn,warps,stages,kpre[,maxnreg]"
# overrides it (the micro-benchmark's best, measured end to end before it becomes the default).
DEFAULT = Config(128, 64, 4, 3, True)


def parse_config(text: str) -> Config:
    """``"bm,bn,warps,stages,kpre[,maxnreg]"`` (kpre 0/1) -> a ``Config``; a clear error otherwise."""
    try:
        fields = [int(v) for v in text.split(",")]
        if len(fields) not in (5, 6):
            raise ValueError
    except ValueError:
        raise ValueError(f"TESSERA_ATTENTION_CONFIG={text!r}: expected 'bm,bn,warps,stages,kpre[,maxnreg]', "
                         "six integers at most, e.g. '128,64,4,3,1'") from None
    bm, bn, warps, stages, kpre, *cap = fields
    if bm not in (16, 32, 64, 128, 256) or bn not in (16, 32, 64, 128, 256) or warps not in (1, 2, 4, 8):
        raise ValueError(f"TESSERA_ATTENTION_CONFIG={text!r}: bm and bn must be powers of two from 16 to 256, "
                         "warps 1, 2, 4 or 8")
    return Config(bm, bn, warps, stages, bool(kpre), cap[0] if cap else None)


CONFIG = parse_config(os.environ["TESSERA_ATTENTION_CONFIG"]) if os.environ.get("TESSERA_ATTENTION_CONFIG") \
    else DEFAULT
PREP_ROWS = 64          # key rows per program of the key pass (and of the split's q/k pass)
MERGE_ROWS = 64         # grid rows per program of the split's merge pass
PREP_WARPS = MERGE_WARPS = 4


def attention_with_lse(q_BHGK: torch.Tensor, k_BHGK: torch.Tensor, v_BHGK: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention and its log-sum-exp, forward only: (out (B, H, G, K) in q's dtype, lse (B, H, G) float32 =
    log sum_s exp(scale q . k_s), natural log). On CUDA aten's cuDNN kernel (flash's where cuDNN is off or on
    ROCm), called directly: the only way to get the log-sum-exp they compute anyway; elsewhere (Triton's CPU
    interpreter) the scores in float32, as written."""
    if q_BHGK.is_cuda:
        if torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled and torch.version.hip is None:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q_BHGK, k_BHGK, v_BHGK, None, True, 0.0, False, False, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q_BHGK, k_BHGK, v_BHGK, 0.0, False, False, scale=scale)[:2]
        return out, lse.reshape(out.shape[:-1])       # cuDNN's is (B, H, G, 1)
    s_BHGS = q_BHGK.float() @ k_BHGK.float().transpose(-1, -2) * scale
    lse = s_BHGS.logsumexp(-1)
    return ((s_BHGS - lse[..., None]).exp() @ v_BHGK.float()).to(q_BHGK.dtype), lse


if triton is not None:
    @triton.jit
    def _norm_rotate(lo, hi, W, cos, sin, f, eps, NORM: tl.constexpr, DT: tl.constexpr, F_: tl.constexpr):
        """RMSNorm (float32, rounded to DT as the torch path returns it) then RoPE (GPT-NeoX halves, float32,
        rounded to DT) of a tile given as its two halves (rows, K/2) and its RoPE tables (float32) -> the rotated
        halves in DT."""
        if NORM:
            r = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * F_) + eps)
            lo = (lo * r[:, None] * tl.load(W + f).to(tl.float32)[None, :]).to(DT).to(tl.float32)
            hi = (hi * r[:, None] * tl.load(W + F_ + f).to(tl.float32)[None, :]).to(DT).to(tl.float32)
        return (lo * cos - hi * sin).to(DT), (hi * cos + lo * sin).to(DT)

    @triton.jit
    def _rows(X_ptr, W, COS, SIN, start, end, s_l, eps, NORM: tl.constexpr, DT: tl.constexpr, F_: tl.constexpr,
              BR: tl.constexpr):
        """Rows [start, start + BR) of q or k (those < end; the rest zero), normalised and rotated: (lo, hi, inside)."""
        f = tl.arange(0, F_)
        rows = start + tl.arange(0, BR)
        inside = rows < end
        lo, hi = _load_norm_rotate(X_ptr, W, COS, SIN, rows, inside, f, s_l, eps, NORM, DT, F_)
        return lo, hi, inside

    @triton.jit
    def _prep_kernel(QKV, QW, KW, COS, SIN, QR, KR, SP, PACC, PSTAT, L, P, s_b, s_l, eps, scale, H: tl.constexpr,
                     K: tl.constexpr, F_: tl.constexpr, NORM: tl.constexpr, BR: tl.constexpr, PB: tl.constexpr,
                     QUERIES: tl.constexpr):
        """Program (i, b * H + h, z), rows [i BR, +BR) of head h. z = 0: the keys normalised and rotated into KR
        (B, H, L, K). With QUERIES (the split method; grid (T, B H, 2)):
        - z = 0 also the P leading queries' attention over these keys, as partials for the merge: PACC (B H, T, PB,
          K) float32 the unnormalised sum of p v, PSTAT (B H, T, 2, PB) the running max (log2 units) and sum of p;
        - z = 1: the queries normalised and rotated into QR (B, H, L, K), and when P > 0 SP (B H, P, L - P)
          float32, each grid query's scores against the P leading keys, scale q_j . k_p (natural-log units)."""
        DT = QKV.dtype.element_ty
        bh, tile = tl.program_id(1), tl.program_id(0)
        b, h = bh // H, bh % H
        f = tl.arange(0, F_)
        rows = tile * BR + tl.arange(0, BR)
        inside = rows < L
        base = QKV + b * s_b + h * K                  # the head's q; its k at + H K, its v at + 2 H K
        dst = bh * L * K + rows[:, None] * K + f[None, :]
        pcol = tl.arange(0, PB)
        if QUERIES:
            # every load first (the P leading rows' masked off when P = 0), so each program waits on memory once
            lead = pcol < P
            if tl.program_id(2) == 1:
                lo, hi, cos, sin = _load_rows(base, COS, SIN, rows, inside, f, s_l, F_)
                c_lo, c_hi, c_cos, c_sin = _load_rows(base + H * K, COS, SIN, pcol, lead, f, s_l, F_)
                q_lo, q_hi = _norm_rotate(lo, hi, QW, cos, sin, f, eps, NORM, DT, F_)
                tl.store(QR + dst, q_lo, mask=inside[:, None])
                tl.store(QR + dst + F_, q_hi, mask=inside[:, None])
                if P > 0:
                    kc_lo, kc_hi = _norm_rotate(c_lo, c_hi, KW, c_cos, c_sin, f, eps, NORM, DT, F_)
                    # a name of its own: Triton 3.6 rejects a variable the branches leave with two shapes
                    s_qc = (tl.dot(q_lo, tl.trans(kc_lo)) + tl.dot(q_hi, tl.trans(kc_hi))) * scale     # (BR, PB)
                    sp = SP + (bh * P + pcol[None, :]) * (L - P) + (rows - P)[:, None]
                    tl.store(sp, s_qc, mask=(inside & (rows >= P))[:, None] & lead[None, :])
            else:
                lo, hi, cos, sin = _load_rows(base + H * K, COS, SIN, rows, inside, f, s_l, F_)
                p_lo, p_hi, p_cos, p_sin = _load_rows(base, COS, SIN, pcol, lead, f, s_l, F_)
                v = tl.load(base + 2 * H * K + rows[:, None] * s_l + tl.arange(0, K)[None, :],
                            mask=(inside & (P > 0))[:, None], other=0.0)
                k_lo, k_hi = _norm_rotate(lo, hi, KW, cos, sin, f, eps, NORM, DT, F_)
                tl.store(KR + dst, k_lo, mask=inside[:, None])
                tl.store(KR + dst + F_, k_hi, mask=inside[:, None])
                if P > 0:
                    qp_lo, qp_hi = _norm_rotate(p_lo, p_hi, QW, p_cos, p_sin, f, eps, NORM, DT, F_)
                    s = (tl.dot(qp_lo, tl.trans(k_lo)) + tl.dot(qp_hi, tl.trans(k_hi))) * scale * 1.4426950408889634
                    s = tl.where(inside[None, :], s, float("-inf"))              # (PB, BR), log2 units
                    m = tl.max(s, axis=1)                                         # finite: row i BR < L is inside
                    p = tl.exp2(s - m[:, None])
                    acc = tl.dot(p.to(DT), v)
                    part = bh * tl.num_programs(0) + tile
                    tl.store(PACC + (part * PB + pcol)[:, None] * K + tl.arange(0, K)[None, :], acc,
                             mask=lead[:, None])
                    tl.store(PSTAT + (part * 2) * PB + pcol, m, mask=lead)
                    tl.store(PSTAT + (part * 2 + 1) * PB + pcol, tl.sum(p, axis=1), mask=lead)
        else:
            k_lo, k_hi = _load_norm_rotate(base + H * K, KW, COS, SIN, rows, inside, f, s_l, eps, NORM, DT, F_)
            tl.store(KR + dst, k_lo, mask=inside[:, None])
            tl.store(KR + dst + F_, k_hi, mask=inside[:, None])

    @triton.jit
    def _load_rows(X_ptr, COS, SIN, rows, inside, f, s_l, F_: tl.constexpr):
        """Given rows of q or k (those ``inside``; the rest zero) as their two halves, and their RoPE tables, all
        float32 and unnormalised: (lo, hi, cos, sin), for ``_norm_rotate``."""
        cos = tl.load(COS + rows[:, None] * F_ + f[None, :], mask=inside[:, None], other=1.0).to(tl.float32)
        sin = tl.load(SIN + rows[:, None] * F_ + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        lo = tl.load(X_ptr + rows[:, None] * s_l + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        hi = tl.load(X_ptr + rows[:, None] * s_l + F_ + f[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        return lo, hi, cos, sin

    @triton.jit
    def _load_norm_rotate(X_ptr, W, COS, SIN, rows, inside, f, s_l, eps, NORM: tl.constexpr, DT: tl.constexpr,
                          F_: tl.constexpr):
        """Given rows of q or k (those ``inside``; the rest zero), normalised and rotated: (lo, hi) in DT."""
        lo, hi, cos, sin = _load_rows(X_ptr, COS, SIN, rows, inside, f, s_l, F_)
        return _norm_rotate(lo, hi, W, cos, sin, f, eps, NORM, DT, F_)

    @triton.jit
    def _online_step(q_lo, q_hi, k_lo, k_hi, v, visible, m_i, l_i, acc, scale, DT: tl.constexpr):
        """One online-softmax step of a query tile over a key tile (``visible`` keys)."""
        s = (tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))) * scale     # log2 units
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))       # finite: every key tile has a visible key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _key_tile(K_ptr, KR_ptr, V_ptr, KW, COS, SIN, start, end, s_l, eps, NORM: tl.constexpr, DT: tl.constexpr,
                  F_: tl.constexpr, BN: tl.constexpr, KPRE: tl.constexpr):
        """Keys [start, start + BN) normalised and rotated (read from the key pass's KR rows with KPRE), their
        values, and which of them are < end."""
        if KPRE:
            f = tl.arange(0, F_)
            rows = start + tl.arange(0, BN)
            visible = rows < end
            k_lo = tl.load(KR_ptr + rows[:, None] * (2 * F_) + f[None, :], mask=visible[:, None], other=0.0)
            k_hi = tl.load(KR_ptr + rows[:, None] * (2 * F_) + F_ + f[None, :], mask=visible[:, None], other=0.0)
        else:
            k_lo, k_hi, visible = _rows(K_ptr, KW, COS, SIN, start, end, s_l, eps, NORM, DT, F_, BN)
            rows = start + tl.arange(0, BN)
        v = tl.load(V_ptr + rows[:, None] * s_l + tl.arange(0, 2 * F_)[None, :], mask=visible[:, None], other=0.0)
        return k_lo, k_hi, v, visible

    @triton.jit
    def _store(O_ptr, so_l, start, end, acc, l_i, K: tl.constexpr, DT: tl.constexpr, BR: tl.constexpr):
        rows = start + tl.arange(0, BR)
        tl.store(O_ptr + rows[:, None] * so_l + tl.arange(0, K)[None, :], (acc / l_i[:, None]).to(DT),
                 mask=(rows < end)[:, None])

    @triton.jit
    def _fused_attention_kernel(QKV, QW, KW, COS, SIN, KR, O, L, P, s_b, s_l, so_b, so_l, eps, scale,
                                H: tl.constexpr, K: tl.constexpr, F_: tl.constexpr, NORM: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, PB: tl.constexpr, KPRE: tl.constexpr):
        """Program (i, b * H + h): query rows [P + i BM, +BM) of head h against every key: the P < 16 leading
        keys (the class token) as one 16-wide tile (when P > 0), then [P, L) in tiles of BN. Program 0 of a
        head also carries the P leading queries as a 16-row tile through the same key tiles, so their keys
        are loaded once for both (a launch of its own for 16 rows per head would stream every key again, on
        too few warps to hide the loads). KPRE: the keys come normalised and rotated from KR (B, H, L, K)."""
        DT = QKV.dtype.element_ty
        b, h = tl.program_id(1) // H, tl.program_id(1) % H
        start = P + tl.program_id(0) * BM
        Q_ptr = QKV + b * s_b + h * K
        K_ptr, V_ptr = Q_ptr + H * K, Q_ptr + 2 * H * K
        KR_ptr = KR + tl.program_id(1) * L * K
        O_ptr = O + b * so_b + h * K
        q_lo, q_hi, _q_in = _rows(Q_ptr, QW, COS, SIN, start, L, s_l, eps, NORM, DT, F_, BM)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, K], tl.float32)
        if (P > 0) & (tl.program_id(0) == 0):    # the leading queries too (16 rows, those < P)
            p_lo, p_hi, _p_in = _rows(Q_ptr, QW, COS, SIN, 0, P, s_l, eps, NORM, DT, F_, PB)
            pm_i = tl.full([PB], float("-inf"), tl.float32)
            pl_i = tl.zeros([PB], tl.float32)
            pacc = tl.zeros([PB, K], tl.float32)
            k0_lo, k0_hi, v0, seen0 = _key_tile(K_ptr, KR_ptr, V_ptr, KW, COS, SIN, 0, P, s_l, eps, NORM, DT, F_, PB,
                                                KPRE)
            m_i, l_i, acc = _online_step(q_lo, q_hi, k0_lo, k0_hi, v0, seen0, m_i, l_i, acc, scale, DT)
            pm_i, pl_i, pacc = _online_step(p_lo, p_hi, k0_lo, k0_hi, v0, seen0, pm_i, pl_i, pacc, scale, DT)
            for kstart in range(P, L, BN):
                k_lo, k_hi, v, seen = _key_tile(K_ptr, KR_ptr, V_ptr, KW, COS, SIN, kstart, L, s_l, eps, NORM, DT,
                                                F_, BN, KPRE)
                m_i, l_i, acc = _online_step(q_lo, q_hi, k_lo, k_hi, v, seen, m_i, l_i, acc, scale, DT)
                pm_i, pl_i, pacc = _online_step(p_lo, p_hi, k_lo, k_hi, v, seen, pm_i, pl_i, pacc, scale, DT)
            _store(O_ptr, so_l, 0, P, pacc, pl_i, K, DT, PB)
        else:
            if P > 0:
                k0_lo, k0_hi, v0, seen0 = _key_tile(K_ptr, KR_ptr, V_ptr, KW, COS, SIN, 0, P, s_l, eps, NORM, DT, F_,
                                                    PB, KPRE)
                m_i, l_i, acc = _online_step(q_lo, q_hi, k0_lo, k0_hi, v0, seen0, m_i, l_i, acc, scale, DT)
            for kstart in range(P, L, BN):
                k_lo, k_hi, v, seen = _key_tile(K_ptr, KR_ptr, V_ptr, KW, COS, SIN, kstart, L, s_l, eps, NORM, DT,
                                                F_, BN, KPRE)
                m_i, l_i, acc = _online_step(q_lo, q_hi, k_lo, k_hi, v, seen, m_i, l_i, acc, scale, DT)
        _store(O_ptr, so_l, start, L, acc, l_i, K, DT, BM)

    @triton.jit
    def _merge_kernel(QKV, OG, LSE, SP, PACC, PSTAT, O, L, P, T, s_b, s_l, og_b, og_h, og_l, lse_b, lse_h, lse_l,
                      so_b, so_l, H: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, PB: tl.constexpr,
                      TB: tl.constexpr):
        """The split's last pass. Program (i, b * H + h): grid rows [i BM, +BM) of head h, out rows P + j, from the
        attention over the grid keys alone (OG (B, H, G, K), its log-sum-exp LSE (B, H, G), natural log) and the
        scores against the P leading keys (SP): with m = max(lse, s_1..s_P),
            out = (e^(lse - m) og + sum_p e^(s_p - m) v_p) / (e^(lse - m) + sum_p e^(s_p - m))
        in float32 (each weight at most 1). Program 0 of a head also combines the P leading queries' T partials
        from the first pass (PACC, PSTAT; TB a power of two >= T) into out's first rows."""
        DT = QKV.dtype.element_ty
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        G = L - P
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        inside = rows < G
        cols = tl.arange(0, K)
        V_ptr = QKV + b * s_b + (2 * H + h) * K
        O_ptr = O + b * so_b + h * K
        pcol = tl.arange(0, PB)
        lead = pcol < P
        # every load first, so a program waits on memory once (the P leading rows' masked off when P = 0)
        lse = tl.load(LSE + b * lse_b + h * lse_h + rows * lse_l, mask=inside, other=0.0)
        og = tl.load(OG + b * og_b + h * og_h + rows[:, None] * og_l + cols[None, :], mask=inside[:, None],
                     other=0.0).to(tl.float32)
        s_p = tl.load(SP + (bh * P + pcol[None, :]) * G + rows[:, None], mask=inside[:, None] & lead[None, :],
                      other=float("-inf"))                                    # (BM, PB)
        v_p = tl.load(V_ptr + pcol[:, None] * s_l + cols[None, :], mask=lead[:, None], other=0.0).to(tl.float32)
        m = tl.maximum(lse, tl.max(s_p, axis=1))
        weight = tl.exp(lse - m)
        w_p = tl.exp(s_p - m[:, None])                                        # 0 at the masked columns
        num = og * weight[:, None] + tl.dot(w_p, v_p, input_precision="ieee")
        den = weight + tl.sum(w_p, axis=1)
        tl.store(O_ptr + (P + rows)[:, None] * so_l + cols[None, :], (num / den[:, None]).to(DT), mask=inside[:, None])
        if (P > 0) & (tl.program_id(0) == 0):     # the leading rows: the first pass's T partials (TB >= T), combined
            t = tl.arange(0, TB)
            seen = (t < T)[:, None] & lead[None, :]
            stat = PSTAT + ((bh * T + t[:, None]) * 2) * PB + pcol[None, :]
            m_t = tl.load(stat, mask=seen, other=float("-inf"))               # (TB, PB), log2 units
            l_t = tl.load(stat + PB, mask=seen, other=0.0)
            acc_t = tl.load(PACC + ((bh * T + t[:, None, None]) * PB + pcol[None, :, None]) * K + cols[None, None, :],
                            mask=seen[:, :, None], other=0.0)                 # (TB, PB, K)
            mx = tl.max(m_t, axis=0)
            mx = tl.where(lead, mx, 0.0)
            scale_t = tl.exp2(m_t - mx[None, :])                              # 0 at the masked entries
            total = tl.sum(scale_t * l_t, axis=0)
            total = tl.where(lead, total, 1.0)                                # rows >= P: not stored
            acc = tl.sum(scale_t[:, :, None] * acc_t, axis=0)
            tl.store(O_ptr + pcol[:, None] * so_l + cols[None, :], (acc / total[:, None]).to(DT), mask=lead[:, None])

    def _packed(qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, L, 3, H, K) with q, k, v and the heads side by side in each token's row, as the kernels index it
        (copied where they are not)."""
        H, K = qkv.shape[3:]
        return qkv if qkv.stride()[2:] == (H * K, K, 1) else qkv.contiguous()

    def _prepare_keys(args: dict) -> None:
        """The key pass before a KPRE config's attention: every head's keys normalised and rotated into KR."""
        kr = args["KR"]
        B, H, L, K = kr.shape
        _prep_kernel[(triton.cdiv(L, PREP_ROWS), B * H, 1)](
            args["QKV"], args["QW"], args["KW"], args["COS"], args["SIN"], kr, kr, kr, kr, kr, L, args["P"],
            args["s_b"], args["s_l"], args["eps"], args["scale"], H=H, K=K, F_=K // 2, NORM=args["NORM"], BR=PREP_ROWS,
            PB=PREFIX_BLOCK, QUERIES=False, num_warps=4)

    def launch(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, eps: float, config: Config | None = None) -> torch.Tensor:
        """The kernel on qkv (B, L, 3, H, K) -> (B, L, H K) with ``CONFIG``, or ``config`` (a ``Config``: the
        tests and the micro-benchmark run each of ``CANDIDATES``)."""
        qkv = _packed(qkv)
        B, L, _, H, K = qkv.shape
        cos, sin = cos.contiguous(), sin.contiguous()
        c = CONFIG if config is None else config
        out = torch.empty(B, L, H * K, dtype=qkv.dtype, device=qkv.device)
        # the key pass's output; without KPRE the kernel never reads it (any valid pointer: out)
        keys = torch.empty(B, H, L, K, dtype=qkv.dtype, device=qkv.device) if c.kpre else out
        P = L % PREFIX_BLOCK
        args = dict(QKV=qkv, QW=q_weight, KW=k_weight, COS=cos, SIN=sin, KR=keys, O=out, L=L, P=P,
                    s_b=qkv.stride(0), s_l=qkv.stride(1), so_b=out.stride(0), so_l=out.stride(1), eps=eps,
                    scale=K ** -0.5 * 1.4426950408889634, H=H, K=K, F_=K // 2, NORM=eps >= 0, PB=PREFIX_BLOCK)
        options = dict(num_warps=c.warps, num_stages=c.stages)
        if c.maxnreg and not INTERPRETED:
            options["maxnreg"] = c.maxnreg
        with on_device(qkv):
            if c.kpre:
                _prepare_keys(args)
            _fused_attention_kernel[(max(triton.cdiv(L - P, c.bm), 1), B * H)](
                **args, BM=c.bm, BN=c.bn, KPRE=c.kpre, **options)
        return out

    def launch_split(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, eps: float) -> torch.Tensor:
        """The "split" method on qkv (B, L, 3, H, K) -> (B, L, H K): ``split_prepare``, ``attention_with_lse`` over
        the L - P grid rows (q and k from the pass, v a view of qkv), then ``split_merge``."""
        qkv = _packed(qkv)
        qr, kr, *prefix = split_prepare(qkv, q_weight, k_weight, cos, sin, eps)
        return split_merge(qkv, *split_attend(qkv, qr, kr), *prefix)

    def split_prepare(qkv, q_weight, k_weight, cos, sin, eps) -> tuple[torch.Tensor, ...]:
        """The split's first pass: q and k normalised and rotated ((B, H, L, K) each), the grid queries' scaled
        scores against the P leading keys ((B H, P, L - P) float32), and the P leading queries' partial
        attention per key tile (``_prep_kernel``'s PACC, PSTAT). The last three are a placeholder when P = 0."""
        B, L, _, H, K = qkv.shape
        P = L % PREFIX_BLOCK
        T = triton.cdiv(L, PREP_ROWS)
        qr = torch.empty(B, H, L, K, dtype=qkv.dtype, device=qkv.device)
        kr = torch.empty_like(qr)
        f32 = dict(dtype=torch.float32, device=qkv.device)
        if P:
            sp, pacc, pstat = (torch.empty(B * H, P, L - P, **f32), torch.empty(B * H, T, PREFIX_BLOCK, K, **f32),
                               torch.empty(B * H, T, 2, PREFIX_BLOCK, **f32))
        else:                           # never read: any float32 pointer, so the kernels compile one way
            sp = pacc = pstat = torch.empty(1, **f32)
        with on_device(qkv):
            _prep_kernel[(T, B * H, 2)](
                qkv, q_weight, k_weight, cos.contiguous(), sin.contiguous(), qr, kr, sp, pacc, pstat, L, P,
                qkv.stride(0), qkv.stride(1), eps, K ** -0.5, H=H, K=K, F_=K // 2, NORM=eps >= 0, BR=PREP_ROWS,
                PB=PREFIX_BLOCK, QUERIES=True, num_warps=PREP_WARPS)
        return qr, kr, sp, pacc, pstat

    def split_attend(qkv, qr, kr) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's attention: the grid rows over the grid keys (B, H, G, K) and their log-sum-exp (B, H, G)."""
        B, L, _, H, K = qkv.shape
        P = L % PREFIX_BLOCK
        if L == P:                      # prefix rows only: nothing to merge (any valid tensors: nothing is read)
            return qr, qr.new_empty(B, H, 1, dtype=torch.float32)
        return attention_with_lse(qr[:, :, P:], kr[:, :, P:], qkv[:, P:, 2].transpose(1, 2), K ** -0.5)

    def split_merge(qkv, og, lse, sp, pacc, pstat) -> torch.Tensor:
        """The split's last pass: the prefix keys merged into the grid rows, and the prefix rows, as (B, L, H K)."""
        B, L, _, H, K = qkv.shape
        P = L % PREFIX_BLOCK
        out = torch.empty(B, L, H * K, dtype=qkv.dtype, device=qkv.device)
        T = triton.cdiv(L, PREP_ROWS)               # the first pass's row tiles: its partials per head
        with on_device(qkv):
            _merge_kernel[(max(triton.cdiv(L - P, MERGE_ROWS), 1), B * H)](
                qkv, og, lse, sp, pacc, pstat, out, L, P, T, qkv.stride(0), qkv.stride(1),
                og.stride(0), og.stride(1), og.stride(2), lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0),
                out.stride(1), H=H, K=K, BM=MERGE_ROWS, PB=PREFIX_BLOCK, TB=triton.next_power_of_2(T),
                num_warps=MERGE_WARPS)
        return out

    @torch.library.custom_op("tessera::fused_attention", mutates_args=())
    def _fused_attention_op(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, eps: float) -> torch.Tensor:
        if METHOD == "split":
            return launch_split(qkv, q_weight, k_weight, cos, sin, eps)
        return launch(qkv, q_weight, k_weight, cos, sin, eps)

    @_fused_attention_op.register_fake
    def _(qkv, q_weight, k_weight, cos, sin, eps):
        B, L, _, H, K = qkv.shape
        return qkv.new_empty(B, L, H * K)
