"""The MaskGIT confidence step's draw over the vocabulary in one pass: classifier-free guidance, the
candidate and its log-probability, straight from the head's bf16 logits.

``confidence_draw(logits, noise, positions, cfg_scale, temperature)`` -> (candidates (B, M) long,
log p(candidate) (B, M) float32), what ``masked.confidence_update``'s torch path computes without top-k
or top-p:

- g = u + s (c - u), the guided logits of the doubled [cond; uncond] batch (s = cfg_scale; without
  guidance, g = the logits), in float32;
- candidate = argmax_v p_v / E_v with p = softmax(g / temperature), E the Exp(1) noise read at each row's
  grid position (``positions``, the head's rows) - taken here as argmax_v (g_v / temperature - log E_v),
  the same ordering without the softmax's normaliser, so one pass suffices;
- its confidence log softmax(g)[candidate] = g_c - logsumexp(g) (an online max and sum).

One Triton program per row keeps a running maximum, sum, best score and index per lane across the
vocabulary and reduces them at the end (the first index among equal best scores, as torch.argmax).
``masked.confidence_update`` calls it where ``use_kernel`` holds (``ENABLED``, CUDA, a temperature > 0,
no top-k / top-p) and runs the torch ops everywhere else. TESSERA_FUSED_DRAW=0 turns it off.

``noise_draw`` is the same draw with the noise made inside the kernel (PyTorch's numbers from the generator's state,
``philox_noise``) at the rows drawn, never stored: what the sampler runs on CUDA (NOTES A46).

Why a kernel (benchmarks/NOTES.md A32): the compiled torch update reads the guided logits and the noise
in three passes (max, sum, then the draw), 0.86 ms of each @16 step at batch 64 on an H200 (13.7 ms per
batch); one pass reads each byte once: 6.9 ms per batch, 256.0 vs 261.0 ms per @16 batch of 64 in the same run
(session 12, torch 2.11, bf16, CFG 2). Rounding: the score is compared in the log domain and the
normaliser is summed in another order, so a candidate can differ from the torch path's only where two
scores tie to within float32 rounding.
"""
from __future__ import annotations

import os

import torch

from generator import philox_noise
from generator.launch import on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch path
    triton = None

ENABLED = os.environ.get("TESSERA_FUSED_DRAW", "1") != "0"
# the draw makes its Exp(1) noise itself, PyTorch's numbers from the generator's state (``noise_draw``, NOTES A46);
# TESSERA_FRESH_NOISE=0: the sampler draws the (B, L, V) noise with exponential_ and the kernel reads it
FRESH_NOISE = os.environ.get("TESSERA_FRESH_NOISE", "1") != "0"
# columns per loop step and warps: one fixed config, not autotuned, because the log-sum-exp's summation order
# (each lane's running sum, then the reduction across lanes) follows it, and a seed must give the same ids in
# every process: an autotuner picking by timing could pick another config in the next run, and a last-bit
# change in log p can swap two confidences at the ranking's cut. (Session 12 measured the kernel autotuned
# among (1024, 4), (2048, 8) and (512, 4); which one it picked was not logged.)
BLOCK, WARPS = 1024, 4


def confidence_draw(logits: torch.Tensor, noise: torch.Tensor, positions: torch.Tensor | None,
                    cfg_scale: float | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (2B, M, V) [cond; uncond] with ``cfg_scale`` (or (B + 1, M, V): one unconditional sequence shared by
    all B, whose positions must then be the same in every row), else (B, M, V); noise (B, L, V) float32 Exp(1);
    positions (B, M) long (each logits row's grid position) or None (M = L, row j is position j).
    -> (candidates (B, M) long, log p(candidate) (B, M) float32). Only where ``use_kernel`` says."""
    one = logits.new_ones((), dtype=torch.float32)      # tensors, not floats: a compiled caller then traces
    knobs = torch.stack([one * (1.0 if cfg_scale is None else cfg_scale), one * temperature])   # one graph
    empty = logits.new_empty(0, dtype=torch.long)
    return torch.ops.tessera.confidence_draw(logits, noise, empty if positions is None else positions, knobs,
                                             cfg_scale is not None)


def use_kernel(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_k: int,
               top_p: float) -> bool:
    """``ENABLED``, and what the kernel covers: CUDA, Triton present, a temperature > 0 (noise drawn), no
    top-k or top-p filter, contiguous logits (any float dtype) and float32 noise."""
    return (ENABLED and triton is not None and logits.is_cuda and noise is not None and temperature > 0
            and (not top_k or top_k >= logits.shape[-1]) and top_p >= 1.0 and logits.is_contiguous()
            and noise.dtype == torch.float32 and noise.is_contiguous())


# noise_draw's largest column block and its warps (one fixed config, as BLOCK above: the block sums' order follows it)
NOISE_BLOCK, NOISE_WARPS = 1024, 4


def check_draw_shapes(logits: torch.Tensor, B: int, L: int, positions: torch.Tensor | None, guided: bool,
                      against: str, columns_match: bool = True) -> None:
    """The draw ops' shape rules, one clear error each: logits (2B or B + 1 rows guided, else B; ``columns_match``:
    as many columns as the noise) against ``against``, positions (B, M), or without positions all L rows."""
    rows, M, _ = logits.shape
    if rows not in ((2 * B, B + 1) if guided else (B,)) or not columns_match:
        raise ValueError(f"logits {tuple(logits.shape)} do not match {against}"
                         f" ({'guided: 2B or B + 1 rows' if guided else 'B rows'})")
    if positions is not None and tuple(positions.shape) != (B, M):
        raise ValueError(f"positions {tuple(positions.shape)} must be (B, M) = {(B, M)}")
    if positions is None and M != L:
        raise ValueError(f"without positions the logits must cover all {L} positions, got {M}")


def noise_block(V: int, threads: int) -> int:
    """Columns per program of ``noise_draw``: the largest power of two from ``NOISE_BLOCK`` down to 256 dividing both
    V and the noise's thread count (a multiple of 256), so each program's four word segments lie inside rows; 0 when
    none does."""
    block = NOISE_BLOCK
    while block >= 256:
        if V % block == 0 and threads % block == 0:
            return block
        block //= 2
    return 0


def use_noise_kernel(B: int, L: int, V: int, device: torch.device, generator: torch.Generator | None,
                     temperature: float, top_k: int, top_p: float) -> bool:
    """Whether a confidence sampling call on ``device`` can make each step's (B, L, V) noise inside its draw
    (``noise_draw``): ``FRESH_NOISE`` and what ``use_kernel`` asks (CUDA, a temperature > 0, no top-k or top-p),
    a CUDA generator (or None), a draw ATen makes in one launch, and a ``noise_block`` for its layout."""
    if not (FRESH_NOISE and ENABLED and triton is not None and device.type == "cuda" and temperature > 0
            and (not top_k or top_k >= V) and top_p >= 1.0 and B * L * V > 0):
        return False
    if generator is not None and generator.device.type != "cuda":
        return False
    numel = B * L * V
    return (philox_noise.matches_torch(numel)
            and noise_block(V, philox_noise.device_layout(numel, device).threads) > 0)


def noise_draw(logits: torch.Tensor, positions: torch.Tensor | None, stream: philox_noise.NoiseStream, B: int,
               L: int, cfg_scale: float | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``confidence_draw(logits, noise, positions, cfg_scale, temperature)`` with noise = the (B, L, V) Exp(1) that
    ``exponential_`` draws from ``stream``'s state (taken from it), made inside the kernel at the rows drawn and
    never stored (NOTES A46). The same candidates; log p summed in another order (per column block, then across
    blocks), so equal to ``confidence_draw``'s up to float32 rounding.

    Programs follow ATen's layout (``philox_noise``): program (p, k) runs Philox call k of threads
    [p BLOCK, (p + 1) BLOCK) and gets four word segments of BLOCK noise elements, each inside one grid row; for
    the segments of rows among ``positions`` it writes the column block's best score, its first column, max and
    sum of exp (skipping Philox where none is); a second kernel combines each row's blocks."""
    rows, M, V = logits.shape
    guided = cfg_scale is not None
    check_draw_shapes(logits, B, L, positions, guided, f"batch {B}")
    if V >= 2**24:
        raise ValueError(f"{V} columns: the kernel's column indices pass through float32")
    layout, start = stream.take(B * L * V)
    block = noise_block(V, layout.threads)
    if not block:
        raise ValueError(f"no column block divides V = {V} and the noise's {layout.threads} threads")
    dev = logits.device
    logits = logits.contiguous()
    # each grid row b L + l -> its logits row b M + j (or -1: not drawn), past the noise's last row too
    slot = torch.full((layout.calls * 4 * layout.threads // V + 1,), -1, dtype=torch.int32, device=dev)
    if positions is None:
        slot[:B * L] = torch.arange(B * L, dtype=torch.int32, device=dev)
    else:
        slot[:B * L].view(B, L).scatter_(1, positions, torch.arange(B * M, dtype=torch.int32, device=dev).view(B, M))
    blocks = V // block
    partials = torch.empty(4, B * M, blocks, dtype=torch.float32, device=dev)
    cand = torch.empty(B, M, dtype=torch.long, device=dev)
    conf = torch.empty(B, M, dtype=torch.float32, device=dev)
    scale = 1.0 if cfg_scale is None else float(cfg_scale)
    half, uncond_rows = B * M * V, max(rows - B, 1) * M
    with on_device(logits):
        _noise_draw_kernel[(layout.threads // block, layout.calls)](
            logits, slot, stream.state, partials, start, V, layout.threads, scale, float(temperature),
            half, uncond_rows, B * M, blocks, GUIDED=guided, DIVIDE=temperature != 1.0, BLOCK=block,
            num_warps=NOISE_WARPS)
        _combine_kernel[(B * M,)](logits, partials, cand, conf, scale, V, half, uncond_rows, B * M, blocks,
                                  GUIDED=guided, BLOCKS=triton.next_power_of_2(blocks), num_warps=1)
    return cand, conf


if triton is not None:
    from generator.philox_noise import curand_words, torch_exponential

    @triton.jit
    def _draw_kernel(LOGITS, NOISE, POS, KNOBS, CAND, CONF, M, L, V, HALF, UNCOND_ROWS,
                     GUIDED: tl.constexpr, GATHER: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)                 # b * M + j
        b = row // M
        uncond_row = LOGITS + HALF + (row % UNCOND_ROWS) * V   # B * M rows: row's own; M (one shared sequence): j
        if GATHER:
            pos = tl.load(POS + row)
        else:
            pos = row % M
        scale = tl.load(KNOBS)
        temperature = tl.load(KNOBS + 1)
        logit_row = LOGITS + row * V
        noise_row = NOISE + (b * L + pos) * V
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1e30, tl.float32)             # per lane: running max of g (finite: no inf - inf),
        s = tl.zeros([BLOCK], tl.float32)                   # sum of exp(g - m)
        best = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: best score g / T - log E, its column
        best_i = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            c = start + cols
            ok = c < V
            g = tl.load(logit_row + c, mask=ok, other=0.0).to(tl.float32)
            if GUIDED:
                u = tl.load(uncond_row + c, mask=ok, other=0.0).to(tl.float32)
                g = u + scale * (g - u)
            g = tl.where(ok, g, float("-inf"))
            e = tl.load(noise_row + c, mask=ok, other=1.0)
            score = tl.where(ok, g / temperature - tl.log(e), float("-inf"))
            take = score > best                             # strict: a lane keeps its first best column
            best_i = tl.where(take, c, best_i)
            best = tl.where(take, score, best)
            m_new = tl.maximum(m, g)
            s = s * tl.exp(m - m_new) + tl.exp(g - m_new)      # out of range: g = -inf adds 0
            m = m_new
        top = tl.max(best, axis=0)
        cand = tl.min(tl.where(best == top, best_i, V), axis=0)     # the first column with the best score
        mx = tl.max(m, axis=0)
        total = tl.sum(s * tl.exp(m - mx), axis=0)         # lanes never in range hold s = 0
        g_c = tl.load(logit_row + cand).to(tl.float32)
        if GUIDED:
            u_c = tl.load(uncond_row + cand).to(tl.float32)
            g_c = u_c + scale * (g_c - u_c)
        tl.store(CAND + row, cand.to(tl.int64))
        tl.store(CONF + row, g_c - (mx + tl.log(total)))

    @torch.library.custom_op("tessera::confidence_draw", mutates_args=())
    def _confidence_draw_op(logits: torch.Tensor, noise: torch.Tensor, positions: torch.Tensor, knobs: torch.Tensor,
                            guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, M, V = logits.shape
        B, L = noise.shape[:2]
        gather = positions.numel() > 0
        check_draw_shapes(logits, B, L, positions if gather else None, guided, f"noise {tuple(noise.shape)}",
                          noise.shape[2] == V)
        cand = torch.empty(B, M, dtype=torch.long, device=logits.device)
        conf = torch.empty(B, M, dtype=torch.float32, device=logits.device)
        if B * M:
            with on_device(logits):
                _draw_kernel[(B * M,)](logits, noise, positions.contiguous() if gather else cand, knobs, cand, conf,
                                       M, L, V, B * M * V, max(rows - B, 1) * M, GUIDED=guided, GATHER=gather,
                                       BLOCK=BLOCK, num_warps=WARPS)
        return cand, conf

    @_confidence_draw_op.register_fake
    def _(logits, noise, positions, knobs, guided):
        B, M = noise.shape[0], logits.shape[1]
        return logits.new_empty(B, M, dtype=torch.long), logits.new_empty(B, M, dtype=torch.float32)

    @triton.jit
    def _block_draw(LOGITS, PART, row, col0, e, scale, temperature, V, HALF, UNCOND_ROWS, R, BLOCKS,
                    GUIDED: tl.constexpr, DIVIDE: tl.constexpr, BLOCK: tl.constexpr):
        """One column block of logits row ``row`` against its noise ``e``: ``_draw_kernel``'s per-column terms
        (the same expressions), reduced over the block into PART[:, row, block]."""
        c = col0 + tl.arange(0, BLOCK)
        g = tl.load(LOGITS + row * V + c).to(tl.float32)
        if GUIDED:
            u = tl.load(LOGITS + HALF + (row % UNCOND_ROWS) * V + c).to(tl.float32)
            g = u + scale * (g - u)
        if DIVIDE:                              # g / 1 is g: the division only where the temperature is not 1
            g_t = g / temperature
        else:
            g_t = g
        score = g_t - tl.log(e)
        best, first = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        top = tl.max(g, axis=0)
        at = PART + row * BLOCKS + col0 // BLOCK
        tl.store(at, best)
        tl.store(at + R * BLOCKS, (col0 + first).to(tl.float32))          # the block's first column of its best
        tl.store(at + 2 * R * BLOCKS, top)
        tl.store(at + 3 * R * BLOCKS, tl.sum(tl.exp(g - top), axis=0))

    @triton.jit
    def _noise_draw_kernel(LOGITS, SLOT, STATE, PART, START, V, T, scale, temperature, HALF, UNCOND_ROWS, R,
                           BLOCKS, GUIDED: tl.constexpr, DIVIDE: tl.constexpr, BLOCK: tl.constexpr):
        t0 = tl.program_id(0) * BLOCK
        call = tl.program_id(1).to(tl.int64)
        li = call * 4 * T + t0                  # word w's segment: noise elements [li + w T, li + w T + BLOCK)
        s0 = tl.load(SLOT + li // V)            # its grid row's logits row, or -1
        s1 = tl.load(SLOT + (li + T) // V)
        s2 = tl.load(SLOT + (li + 2 * T) // V)
        s3 = tl.load(SLOT + (li + 3 * T) // V)
        if (s0 >= 0) | (s1 >= 0) | (s2 >= 0) | (s3 >= 0):
            offset = tl.load(STATE + 1) + START
            x0, x1, x2, x3 = curand_words(tl.load(STATE), offset, call, t0 + tl.arange(0, BLOCK))
            if s0 >= 0:
                _block_draw(LOGITS, PART, s0.to(tl.int64), (li % V).to(tl.int32), torch_exponential(x0), scale,
                            temperature, V, HALF, UNCOND_ROWS, R, BLOCKS, GUIDED, DIVIDE, BLOCK)
            if s1 >= 0:
                _block_draw(LOGITS, PART, s1.to(tl.int64), ((li + T) % V).to(tl.int32), torch_exponential(x1), scale,
                            temperature, V, HALF, UNCOND_ROWS, R, BLOCKS, GUIDED, DIVIDE, BLOCK)
            if s2 >= 0:
                _block_draw(LOGITS, PART, s2.to(tl.int64), ((li + 2 * T) % V).to(tl.int32), torch_exponential(x2),
                            scale, temperature, V, HALF, UNCOND_ROWS, R, BLOCKS, GUIDED, DIVIDE, BLOCK)
            if s3 >= 0:
                _block_draw(LOGITS, PART, s3.to(tl.int64), ((li + 3 * T) % V).to(tl.int32), torch_exponential(x3),
                            scale, temperature, V, HALF, UNCOND_ROWS, R, BLOCKS, GUIDED, DIVIDE, BLOCK)

    @triton.jit
    def _combine_kernel(LOGITS, PART, CAND, CONF, scale, V, HALF, UNCOND_ROWS, R, NUM_BLOCKS,
                        GUIDED: tl.constexpr, BLOCKS: tl.constexpr):
        """Row ``row``'s column blocks: the first column of the best score, log p(candidate) = g_c - logsumexp(g)."""
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCKS)
        ok = k < NUM_BLOCKS
        at = PART + row * NUM_BLOCKS + k
        best = tl.load(at, mask=ok, other=float("-inf"))
        first = tl.load(at + R * NUM_BLOCKS, mask=ok, other=V).to(tl.int32)
        top = tl.load(at + 2 * R * NUM_BLOCKS, mask=ok, other=-1e30)
        total = tl.load(at + 3 * R * NUM_BLOCKS, mask=ok, other=0.0)
        cand = tl.min(tl.where(best == tl.max(best, axis=0), first, V), axis=0)
        mx = tl.max(top, axis=0)
        lse = mx + tl.log(tl.sum(total * tl.exp(top - mx), axis=0))
        g_c = tl.load(LOGITS + row * V + cand).to(tl.float32)
        if GUIDED:
            u_c = tl.load(LOGITS + HALF + (row % UNCOND_ROWS) * V + cand).to(tl.float32)
            g_c = u_c + scale * (g_c - u_c)
        tl.store(CAND + row, cand.to(tl.int64))
        tl.store(CONF + row, g_c - lse)
