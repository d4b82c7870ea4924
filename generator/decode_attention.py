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

import torch

from generator.launch import int32_offsets, on_device

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


def use_kernel(q, k, v, mask) -> bool:
    """The kernel covers: CUDA, Triton present, a power-of-two head size, one shared (1, S) mask row,
    unit-stride head dimension (past int32 offsets the op runs the reference)."""
    K = q.shape[-1]
    return (triton is not None and q.is_cuda and q.shape[2] == 1 and mask.dim() == 2 and mask.shape[0] == 1
            and mask.dtype == torch.bool and K & (K - 1) == 0 and K >= 16
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


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
    def _one_query_kernel(Q, K, V, M, O, PART, TICKET, S, chunk, scale,
                          sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_s, so_b, so_h,
                          H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
        """Program (b h, split) streams slots [split chunk, (split + 1) chunk) in blocks with an online softmax in
        float32. One split: it writes the output. Several: it writes its (acc, max, sum) to PART, takes a ticket,
        and the last of the SPLITS programs of (b, h) combines them."""
        pid, split = tl.program_id(0), tl.program_id(1)
        b, h = pid // H, pid % H
        d = tl.arange(0, D)
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
            score = tl.where(visible, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(score, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)    # nothing visible yet: exp(-inf) = 0, no NaN
            p = tl.exp(score - m_ref)
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
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

    @torch.library.custom_op("tessera::attend_one_query", mutates_args=())
    def _attend_one_query_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))   # if a compiler re-laid them
        if not int32_offsets(q, k, v):     # checked here, on the real shapes (the compiled step's are symbolic)
            return attend_one_query_reference(q, k, v, mask)
        B, H, S, D = k.shape
        out = torch.empty(B, H, 1, D, dtype=v.dtype, device=v.device)
        block, warps, splits = launch_config(B * H)
        if splits > 1:          # each program's part: D weighted values, its max and its sum, in float32
            part = torch.empty(B * H * splits * (D + 2), dtype=torch.float32, device=v.device)
            ticket = tickets(v.device, splits, B * H)
        else:
            part = ticket = out
        with on_device(q):
            _one_query_kernel[(B * H, splits)](q, k, v, mask, out, part, ticket, S, triton.cdiv(S, splits), D ** -0.5,
                                               q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                                               v.stride(0), v.stride(1), v.stride(2), mask.stride(1),
                                               out.stride(0), out.stride(1), H=H, D=D, BLOCK=block, SPLITS=splits,
                                               num_warps=warps)
        return out

    @_attend_one_query_op.register_fake
    def _(q, k, v, mask):
        return v.new_empty(k.shape[0], k.shape[1], 1, k.shape[3])
