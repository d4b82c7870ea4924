"""Attention of one query per sequence over a KV cache (cached AR decoding).

``attend_one_query(q, k, v, mask)`` = softmax(q k^T / sqrt(K), -inf where the mask is False) v.
On CUDA (with Triton, the one every torch GPU wheel ships) it runs one fused kernel that streams
each sequence's keys and values once with an online softmax; elsewhere, and for masks it does not
cover, the same maths as torch ops. With few sequences (batch 1-4 under CFG: 24-96 (sequence, head)
programs on 132 SMs) the kernel can split each sequence's slots over ``splits`` programs
(flash-decoding): each writes its part's (max, sum, weighted values) and the last of them to finish
combines the parts, in the same launch (a ticket counter per sequence and head).

Why a kernel: the step is memory-bound (read K and V once). With a mask SDPA runs the memory-efficient
kernel, which computes 64-query tiles for this one query (70 us per layer at batch 2x64, 65% of an
AR-B step's GPU time: benchmarks/NOTES.md A13); the torch-ops version below, fused by inductor, still
takes three kernels (q.k reduction, softmax, P V mat-vec: 29 us per layer, ~40% of the step; A17).
"""
from __future__ import annotations

import os

import torch

from generator.launch import gdc_launch_dependents, gdc_wait, int32_offsets, on_device, pdl_kwargs

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None


def attend_one_query_reference(q_BH1K: torch.Tensor, k_BHSK: torch.Tensor, v_BHSK: torch.Tensor,
                               mask_1S: torch.Tensor) -> torch.Tensor:
    """The torch-ops version: scores as float32 products and sums (one reduction reading the keys
    once under torch.compile), then P V as a batched mat-vec in v's dtype (P rounded to it, as flash
    attention does). Output (B, H, 1, K) in v's dtype."""
    scores_BHS = (q_BH1K.float() * k_BHSK.float()).sum(-1) * q_BH1K.shape[-1] ** -0.5
    probs_BH1S = scores_BHS.masked_fill(~mask_1S, float("-inf")).softmax(-1)[:, :, None]
    return probs_BH1S.to(v_BHSK.dtype) @ v_BHSK


def attend_one_query(q_BH1K: torch.Tensor, k_BHSK: torch.Tensor, v_BHSK: torch.Tensor,
                     mask_1S: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(K) where ``mask_1S`` (1, S) bool is True, else -inf) v -> (B, H, 1, K) in
    v's dtype. q (B, H, 1, K); k, v (B, H, S, K) (slices of a cache: any strides with a unit last one).
    The kernel keeps P in float32 (more exact than the reference's bf16 P V); the two agree to bf16
    rounding, which can move a late draw of a sampled sequence."""
    if use_kernel(q_BH1K, k_BHSK, v_BHSK, mask_1S):
        return torch.ops.tessera.attend_one_query(q_BH1K, k_BHSK, v_BHSK, mask_1S)
    return attend_one_query_reference(q_BH1K, k_BHSK, v_BHSK, mask_1S)


def attend_new_query(qkv_B3HK: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                     cos_1F: torch.Tensor, sin_1F: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos_1: torch.Tensor, mask_1S: torch.Tensor) -> torch.Tensor:
    """A cached step's attention from its qkv projection (B, 3, H, K), one kernel where ``use_new_query_kernel``
    holds: q and the new key through RMSNorm (weights ``q_norm``, ``k_norm``; None: no qk-norm) and RoPE at the
    ``cos_1F``/``sin_1F`` row, the new key and value written into the caches (B, H, max_len, K) at slot ``pos_1``
    ((1,) long, unchecked past a bound check on the device), then q attending to the first S slots that
    ``mask_1S`` (1, S) covers -> (B, H, 1, K). ``attend_new_query_reference`` is the same in torch ops."""
    return torch.ops.tessera.attend_new_query(qkv_B3HK, q_norm, k_norm, eps, cos_1F, sin_1F, k_cache, v_cache,
                                              pos_1, mask_1S)


def attend_new_query_reference(qkv_B3HK, q_norm, k_norm, eps, cos_1F, sin_1F, k_cache, v_cache, pos_1, mask_1S):
    """``attend_new_query`` as ``transformer.Attention`` runs a cached step in torch ops (the op's path past int32
    offsets, and the tests' formula)."""
    from generator.transformer import apply_rope, rms_norm     # transformer imports this module
    q, k, v = qkv_B3HK.unbind(1)
    q, k = (apply_rope(x if w is None else rms_norm(x, w, eps), cos_1F, sin_1F) for x, w in ((q, q_norm), (k, k_norm)))
    k_cache.index_copy_(2, pos_1, k[:, :, None].to(k_cache.dtype))
    v_cache.index_copy_(2, pos_1, v[:, :, None].to(v_cache.dtype))
    S = mask_1S.shape[1]
    return attend_one_query_reference(q[:, :, None], k_cache[:, :, :S].to(q.dtype), v_cache[:, :, :S].to(q.dtype),
                                      mask_1S)


def use_new_query_kernel(qkv_B3HK: torch.Tensor, k_cache: torch.Tensor, mask_1S: torch.Tensor,
                         cos_1F: torch.Tensor) -> bool:
    """``NEW_QUERY``, CUDA, Triton present, outside autograd, ``split_launch`` and ``new_query_shapes``."""
    return (NEW_QUERY and triton is not None and qkv_B3HK.is_cuda and not torch.is_grad_enabled()
            and split_launch(qkv_B3HK) and new_query_shapes(qkv_B3HK, k_cache, mask_1S, cos_1F))


def split_launch(qkv_B3HK: torch.Tensor) -> bool:
    """A few sequences, whose one-query attention splits each one's slots over several programs (``launch_config``):
    the latency-bound steps where the fused new query gained (AR-B batch 1 on the H100, NOTES A56: 107 vs 110 ms).
    At batch 64 it was slower (303 vs 333 img/s): there the unsplit kernel keeps its own launch."""
    return launch_config(qkv_B3HK.shape[0] * qkv_B3HK.shape[2])[2] > 1


def new_query_shapes(qkv_B3HK: torch.Tensor, k_cache: torch.Tensor, mask_1S: torch.Tensor,
                     cos_1F: torch.Tensor) -> bool:
    """What the kernel covers: ``use_kernel``'s head sizes and one shared (1, S) bool mask row over at most the
    cache's slots, a step of one position (one table row) whose caches hold the projection's dtype."""
    K = qkv_B3HK.shape[-1]
    return (mask_1S.dim() == 2 and mask_1S.shape[0] == 1 and mask_1S.dtype == torch.bool
            and mask_1S.shape[1] <= k_cache.shape[2] and K & (K - 1) == 0 and K >= 16
            and k_cache.dtype == qkv_B3HK.dtype and cos_1F.shape[0] == 1)


def use_kernel(q, k, v, mask) -> bool:
    """The kernel covers: CUDA, Triton present, a power-of-two head size, one shared (1, S) mask row,
    unit-stride head dimension (past int32 offsets the op runs the reference)."""
    K = q.shape[-1]
    return (triton is not None and q.is_cuda and q.shape[2] == 1 and mask.dim() == 2 and mask.shape[0] == 1
            and mask.dtype == torch.bool and K & (K - 1) == 0 and K >= 16
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


# a cached step's qk-norm, RoPE and cache write inside its attention kernel (``attend_new_query``, NOTES A56): one
# launch less per layer and token; off, inductor fuses them into a kernel of their own. On for ``split_launch``
# steps (measured: jobs sample-ar-fused-query and sample-ar-unfused-query); TESSERA_NEW_QUERY=0 turns it off
NEW_QUERY = os.environ.get("TESSERA_NEW_QUERY", "1") != "0"

# (cache slots per loop iteration, warps per program, programs per (sequence, head)) from sweeps
# (``benchmarks/decode_attention``, head size 64): with thousands of programs small ones keep the most loads in
# flight (H100, NOTES A17: 32 slots, 2 warps: 27 us at 2x64x12 sequences of 160 slots, vs 34 for 64/4); at batch 1
# (24 sequence-heads on 132 SMs) one program per sequence-head is latency-bound, so each one's slots split over 8
# programs (H200, A54: 3.9 us per call at 160 and 256 slots, vs 5.3 and 5.7 with one program of 8 warps; AR-B
# batch 1 108 vs 112 ms, the same ids)
MANY, FEW = (32, 2, 1), (32, 2, 8)


def launch_config(programs: int) -> tuple[int, int, int]:
    """(cache slots per loop iteration, warps per program, splits) for ``programs`` = batch x heads."""
    return MANY if programs >= 256 else FEW


_tickets: dict[tuple, torch.Tensor] = {}


def tickets(device: torch.device, splits: int, programs: int) -> torch.Tensor:
    """The split kernel's int32 counters, one per (sequence, head), kept per (device, stream, splits): each call
    adds ``splits`` (a power of two) to each, so modulo 2^32 they stay multiples of it between calls and are never
    reset (no memset launch). Kernels on one stream run one after another; a counter is never shared by two at
    once."""
    if splits & (splits - 1):
        raise ValueError(f"the split kernel's splits must be a power of two, got {splits}")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, splits)
    buf = _tickets.get(key)
    if buf is None or buf.numel() < programs:
        buf = _tickets[key] = torch.zeros(max(programs, 1024), dtype=torch.int32, device=device)
    return buf


if triton is not None:
    @triton.jit
    def _norm_rope(X, d, partner, W, eps, cos, sin, sign, D: tl.constexpr, NORM: tl.constexpr):
        """One head's row of X (D values) through RMSNorm with weight W (NORM) and RoPE (GPT-NeoX halves; ``partner``
        = (d + D/2) mod D, ``sign`` -1 on the first half), each rounded to X's dtype as the torch ops return it;
        in float32."""
        x = tl.load(X + d).to(tl.float32)
        xp = tl.load(X + partner).to(tl.float32)
        if NORM:
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            x = (x * rstd * tl.load(W + d).to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
            xp = (xp * rstd * tl.load(W + partner).to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)
        return (x * cos + sign * (xp * sin)).to(X.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _one_query_kernel(Q, K, V, M, O, PART, TICKET, S, chunk, scale,
                          sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_s, so_b, so_h,
                          QN, KN, COS, SIN, POS, eps, sq_3, max_len,
                          H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                          NEW: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
                          TRIGGER_FIRST: tl.constexpr):
        """Program (b h, split) streams slots [split chunk, (split + 1) chunk) in blocks with an online softmax in
        float32. One split: it writes the output. Several: it writes its (acc, max, sum) to PART, takes a ticket,
        and the last of the SPLITS programs of (b, h) combines them.

        NEW: Q is the step's qkv projection (q, k, v ``sq_3`` apart) and K, V the whole caches: every program
        makes q (qk-norm with weight QN if QK_NORM, RoPE at the COS/SIN row), the program whose part holds slot
        ``pos`` (the last one if none does) makes the new key (norm KN, RoPE) and writes it and the new value at
        ``pos`` (< ``max_len``) of the caches, and reads them from its registers at that slot.

        PDL: launched while the kernel before it runs; it waits for that one's end before it reads anything, and
        lets the next kernel start (whose weight loads then overlap this one) first or after its wait."""
        if PDL:
            if TRIGGER_FIRST:
                gdc_launch_dependents()
            gdc_wait()
            if not TRIGGER_FIRST:
                gdc_launch_dependents()
        pid, split = tl.program_id(0), tl.program_id(1)
        b, h = pid // H, pid % H
        d = tl.arange(0, D)
        if NEW:
            pos = tl.load(POS)
            partner = (d + D // 2) % D
            sign = tl.where(d < D // 2, -1.0, 1.0)
            cos = tl.load(COS + d % (D // 2)).to(tl.float32)
            sin = tl.load(SIN + d % (D // 2)).to(tl.float32)
            row = Q + b * sq_b + h * sq_h
            q = _norm_rope(row, d, partner, QN, eps, cos, sin, sign, D, QK_NORM) * scale
            k_new = _norm_rope(row + sq_3, d, partner, KN, eps, cos, sin, sign, D, QK_NORM)
            v_new = tl.load(row + 2 * sq_3 + d).to(tl.float32)
            writes = (split == tl.minimum(pos // chunk, SPLITS - 1)) & (pos < max_len) & (d < D)
            tl.store(K + b * sk_b + h * sk_h + pos * sk_s + d, k_new.to(K.dtype.element_ty), mask=writes)
            tl.store(V + b * sv_b + h * sv_h + pos * sv_s + d, v_new.to(V.dtype.element_ty), mask=writes)
        else:
            q = tl.load(Q + b * sq_b + h * sq_h + d).to(tl.float32) * scale
        m_i = tl.full([], float("-inf"), tl.float32)      # running max of the visible scores
        l_i = tl.zeros([], tl.float32)                    # running sum of exp(score - m_i)
        acc = tl.zeros([D], tl.float32)                   # running sum of exp(score - m_i) v
        lo = split * chunk
        hi = tl.minimum(lo + chunk, S)
        for start in range(lo, hi, BLOCK):
            s = start + tl.arange(0, BLOCK)
            inside = s < hi
            visible = (tl.load(M + s * sm_s, mask=inside, other=0) != 0) & inside
            k = tl.load(K + b * sk_b + h * sk_h + s[:, None] * sk_s + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(V + b * sv_b + h * sv_h + s[:, None] * sv_s + d[None, :], mask=inside[:, None], other=0.0)
            k, v = k.to(tl.float32), v.to(tl.float32)
            if NEW:                                       # slot pos: the key and value this program wrote
                k = tl.where((s == pos)[:, None], k_new[None, :], k)
                v = tl.where((s == pos)[:, None], v_new[None, :], v)
            score = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(score, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)    # nothing visible yet: exp(-inf) = 0, no NaN
            p = tl.exp(score - m_ref)
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        out = O + b * so_b + h * so_h + d
        if SPLITS == 1:
            tl.store(out, (acc / l_i).to(O.dtype.element_ty))
        else:
            part = PART + (pid * SPLITS + split) * (D + 2)
            tl.store(part + d, acc)
            tl.store(part + D, m_i)
            tl.store(part + D + 1, l_i)
            tl.debug_barrier()                            # every lane's stores before the ticket (acq_rel, gpu scope)
            ticket = tl.atomic_add(TICKET + pid, 1)
            if (ticket & (SPLITS - 1)) == SPLITS - 1:     # the last part of (b, h) in: combine (L2 reads, not L1's)
                parts = PART + (pid * SPLITS + tl.arange(0, SPLITS)) * (D + 2)
                m_j = tl.load(parts + D, cache_modifier=".cg")
                l_j = tl.load(parts + D + 1, cache_modifier=".cg")
                acc_j = tl.load(parts[:, None] + d[None, :], cache_modifier=".cg")
                m = tl.max(m_j, axis=0)
                w = tl.exp(m_j - tl.where(m == float("-inf"), 0.0, m))     # an empty part: exp(-inf) = 0
                tl.store(out, (tl.sum(w[:, None] * acc_j, axis=0) / tl.sum(w * l_j, axis=0)).to(O.dtype.element_ty))

    def launch(q, k, v, mask, S: int, new: tuple | None = None) -> torch.Tensor:
        """The kernel over the first S slots of k, v (B, H, >= S, D) -> (B, H, 1, D) in v's dtype. ``new``: (q_norm,
        k_norm, eps, cos, sin, pos) of a step whose q is the qkv projection (B, 3, H, D) (NEW)."""
        B, H, _, D = k.shape
        out = torch.empty(B, H, 1, D, dtype=v.dtype, device=v.device)
        block, warps, splits = launch_config(B * H)
        if splits > 1:          # each program's part: D weighted values, its max and its sum, in float32
            part = torch.empty(B * H * splits * (D + 2), dtype=torch.float32, device=v.device)
            ticket = tickets(v.device, splits, B * H)
        else:
            part = ticket = out
        q_norm, k_norm, eps, cos, sin, pos = new or (None, None, 0.0, out, out, ticket)
        with on_device(q):
            _one_query_kernel[(B * H, splits)](
                q, k, v, mask, out, part, ticket, S, triton.cdiv(S, splits), D ** -0.5,
                q.stride(0), q.stride(2 if new else 1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                v.stride(2), mask.stride(1), out.stride(0), out.stride(1),
                out if q_norm is None else q_norm, out if k_norm is None else k_norm, cos, sin, pos, eps,
                q.stride(1) if new else 0, k.shape[2],
                H=H, D=D, BLOCK=block, SPLITS=splits, NEW=new is not None, QK_NORM=q_norm is not None,
                num_warps=warps, **pdl_kwargs(q))
        return out

    # flexible_layout: inductor hands the op its inputs in whatever layout they have (the op reads strides), so a
    # step's RoPE rows and mask row, gathered once, reach every layer's call as one buffer; under the default
    # (exact strides) inductor copied them for each call: a kernel per layer and token (NOTES A58)
    @torch.library.custom_op("tessera::attend_one_query", mutates_args=(), tags=(torch.Tag.flexible_layout,))
    def _attend_one_query_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))   # if a compiler re-laid them
        if not int32_offsets(q, k, v):     # checked here, on the real shapes (the compiled step's are symbolic)
            return attend_one_query_reference(q, k, v, mask)
        return launch(q, k, v, mask, k.shape[2])

    @_attend_one_query_op.register_fake
    def _(q, k, v, mask):
        return v.new_empty(k.shape[0], k.shape[1], 1, k.shape[3])

    @torch.library.custom_op("tessera::attend_new_query", mutates_args=("k_cache", "v_cache"),
                             tags=(torch.Tag.flexible_layout,))          # as attend_one_query
    def _attend_new_query_op(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                             cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        if not (int32_offsets(qkv, k_cache, v_cache) and k_cache.stride(-1) == v_cache.stride(-1) == 1):
            return attend_new_query_reference(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, pos, mask)
        q_norm, k_norm = (None if w is None else w.contiguous() for w in (q_norm, k_norm))
        return launch(qkv, k_cache, v_cache, mask, mask.shape[1],
                      new=(q_norm, k_norm, eps, cos.contiguous(), sin.contiguous(), pos))

    @_attend_new_query_op.register_fake
    def _(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, pos, mask):
        return v_cache.new_empty(k_cache.shape[0], k_cache.shape[1], 1, k_cache.shape[3])
