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

Two main loops, both candidates of one autotuner (the GPU picks the faster): ``tl.load`` (cp.async) into
wgmma, and TMA (``TMA_CONFIGS``, measured in session 12: the autotuner picks a persistent one, 0.426 ms per
masked-B layer-step, 76% of cuBLAS's matmul speed, still slower than the torch path): device-side tensor descriptors
(``tl.make_tensor_descriptor``, Triton >= 3.4; their 128-byte descriptors live in a scratch buffer that
``triton.set_allocator``'s allocator gives each launch, here ``torch.empty`` on the current stream, so CUDA graphs
capture it), the x and Wg/Wu tiles loaded by the copy engine (zero-filled past M, N, K) and the output stored
through a descriptor (clipped at M, N), one tile per program or persistent (a program per SM looping over
tiles, the loads' pipeline running on into the next tile). TMA needs 16-byte aligned rows (K and N
multiples of 8) and sm_90+; elsewhere, on Triton without the API, and on the CPU interpreter, only the
``tl.load`` configs run. The autotuner stays because the kernel is an opt-in experiment: the candidates
differ in BK (32 or 64) and tile shape, so in how the K sum is grouped, and a timing-based pick could change
a value's last bit, and so a seed's late tokens, between processes. Before it could go on by default it needs
one fixed config, as the attention (NOTES A33) and draw (A32) kernels have.

Why a kernel (benchmarks/NOTES.md A31, the prediction): in masked-B sampling (M = 128 x 257 = 32896 rows,
D 768, Hd 2048) cuBLAS writes the (M, 2 Hd) bf16 gate_up output (270 MB) and inductor's silu*up kernel
reads it back to write (M, Hd): ~0.09 ms per layer-step, ~18 ms of a ~271 ms batch on an H200. Here the
(M, 2 Hd) product never leaves the registers.
"""
from __future__ import annotations

import functools
import os

import torch

from generator.launch import INTERPRETED, linear_in_half, on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None
# device-side tensor descriptors (TMA on sm_90+): tl.make_tensor_descriptor, the same signature in Triton 3.6 and 3.8
HAS_TMA = triton is not None and hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")

# opt-in, measured slower (NOTES A31): TESSERA_FUSED_SWIGLU=1, or set this before the first forward
ENABLED = os.environ.get("TESSERA_FUSED_SWIGLU") == "1"


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
    N2, D = weight.shape
    return (linear_in_half(x, weight) and weight.is_cuda and weight.is_contiguous()
            and x.shape[-1] == D and D % 16 == 0 and N2 % 32 == 0)


# the autotuner's candidates (BM rows, BN hidden columns of each branch, BK, warps, stages, GROUP_M); the
# first is the one the CPU interpreter runs. Two float32 (BM, BN) accumulators per program: BM BN / 128
# registers per thread at 8 warps, so 128 x 128 needs 8 warps and a 128 x 256 tile would spill; shared
# memory per stage (BM + 2 BN) BK 2 bytes, 48 KB at 128 x 128 x 64 (Hopper: up to 227 KB per block).
# The 64-row tiles are for small M (batch 1: 514 rows would fill only 80 of 132 SMs with 128 x 128 tiles)
CONFIGS = [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 128, 32, 8, 5, 8), (256, 64, 64, 8, 3, 8),
           (128, 64, 64, 4, 4, 8), (128, 64, 64, 8, 4, 8), (64, 128, 64, 4, 4, 8), (64, 64, 64, 4, 4, 8)]
# TMA candidates (same fields, then persistent: a program per SM looping over tiles), only where Triton has
# device-side descriptors. Shared memory per stage as above; persistent ones add the output tile staged for
# its TMA store (BM BN 2 bytes, 32 KB at 128 x 128: 4 stages of 128 x 128 x 64 come to 224 of Hopper's 227 KB),
# one tile per program reuses the stages' memory for it (Triton 3.6 and 3.8 compile them alike for sm_90)
TMA_CONFIGS = [(128, 128, 64, 8, 3, 8, False), (128, 128, 64, 8, 4, 8, False), (128, 128, 64, 8, 3, 8, True),
               (128, 128, 64, 8, 4, 8, True), (128, 64, 64, 4, 4, 8, True), (256, 64, 64, 8, 3, 8, True),
               ] if HAS_TMA else []


def m_bucket(M: int) -> int:
    """The autotuner's key for M: its next power of two, so a new M does not time the configs again."""
    return 1 << max(M - 1, 0).bit_length()


def tma_ok(N: int, K: int) -> bool:
    """Whether the TMA configs can run at this N, K (the autotuner's key): rows of x, W and the output 16-byte
    aligned (K, N multiples of 8 elements; the op copies x where its rows or start are not), and a sm_90+ GPU."""
    return (HAS_TMA and N % 8 == 0 and K % 8 == 0 and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


if triton is not None:
    @triton.jit
    def _tile_of(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """Tile number -> (row tile, column tile): GROUP_M rows of tiles at a time, column by column."""
        first_m = tile // (GROUP_M * tiles_n) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * tiles_n)) % group_m
        pid_n = (tile % (GROUP_M * tiles_n)) // group_m
        return pid_m, pid_n

    @triton.jit
    def _tma_tile(x_desc, wg_desc, wu_desc, o_desc, pid_m, pid_n, K, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
        """One BM x BN output tile through tensor descriptors: TMA loads (zero past M, N, K), TMA store
        (clipped at M, N); the same rounding as the tl.load loop."""
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in tl.range(0, K, BK):
            x = x_desc.load([pid_m * BM, k0])                                               # (BM, BK)
            acc_g = tl.dot(x, wg_desc.load([pid_n * BN, k0]).T, acc=acc_g)                 # (BN, BK)^T
            acc_u = tl.dot(x, wu_desc.load([pid_n * BN, k0]).T, acc=acc_u)
        DT = o_desc.dtype
        g = acc_g.to(DT).to(tl.float32)
        u = acc_u.to(DT).to(tl.float32)
        o_desc.store([pid_m * BM, pid_n * BN], (g * tl.sigmoid(g) * u).to(DT))

    @triton.jit
    def _tma_tiles(X, W, O, M, N, K, s_xm, s_om, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr):
        """The TMA main loop: descriptors made on the device (x (M, K), Wg = W[:N] and Wu = W[N:] (N, K), the
        output (M, N)), then one tile per program, or (PERSISTENT) tiles pid, pid + programs, ... so the
        pipeline runs on across tiles (flatten)."""
        x_desc = tl.make_tensor_descriptor(X, [M, K], [s_xm, 1], [BM, BK])
        wg_desc = tl.make_tensor_descriptor(W, [N, K], [K, 1], [BN, BK])
        wu_desc = tl.make_tensor_descriptor(W + N * K, [N, K], [K, 1], [BN, BK])
        o_desc = tl.make_tensor_descriptor(O, [M, N], [s_om, 1], [BM, BN])
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        if PERSISTENT:
            for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=True):
                pid_m, pid_n = _tile_of(tile, tiles_m, tiles_n, GROUP_M)
                _tma_tile(x_desc, wg_desc, wu_desc, o_desc, pid_m, pid_n, K, BM, BN, BK)
        else:
            pid_m, pid_n = _tile_of(tl.program_id(0), tiles_m, tiles_n, GROUP_M)
            _tma_tile(x_desc, wg_desc, wu_desc, o_desc, pid_m, pid_n, K, BM, BN, BK)

    @triton.jit
    def _fused_swiglu_kernel(X, W, O, M, N, K, s_xm, s_om, M_BUCKET, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                             TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False):
        """Program p: out tile rows [pid_m BM, +BM) x hidden columns [pid_n BN, +BN) (those < M, < N), p
        walking the tiles GROUP_M rows of tiles at a time, column by column. M_BUCKET only keys the autotuner.
        TMA: the descriptor main loop instead (``_tma_tiles``; needs ``tma_ok``, x's rows 16-byte aligned)."""
        if TMA:
            _tma_tiles(X, W, O, M, N, K, s_xm, s_om, BM, BN, BK, GROUP_M, PERSISTENT)
        else:
            DT = O.dtype.element_ty
            pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
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

    def _prune(configs, named_args, **kwargs):
        """The TMA configs only where ``tma_ok`` (N, K are in the autotuner's key, so a cached pick holds)."""
        if tma_ok(named_args["N"], named_args["K"]):
            return configs
        return [c for c in configs if not c.kwargs.get("TMA")]

    _tuned_kernel = triton.autotune(     # timed once per (N, K, M's power of two, dtype) in a process
        [triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, TMA=False, PERSISTENT=False), num_warps=w,
                       num_stages=st) for bm, bn, bk, w, st, gm in CONFIGS[:1 if INTERPRETED else None]]
        + [triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, TMA=True, PERSISTENT=p), num_warps=w, num_stages=st)
           for bm, bn, bk, w, st, gm, p in ([] if INTERPRETED else TMA_CONFIGS)],
        key=["N", "K", "M_BUCKET"], prune_configs_by=dict(early_config_prune=_prune),
    )(triton.heuristics(dict(EVEN_K=lambda args: args["K"] % args["BK"] == 0))(_fused_swiglu_kernel))

    @functools.lru_cache
    def _sm_count(device: int) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def grid(M: int, N: int, BM: int, BN: int, persistent: bool = False, programs: int = 0) -> tuple[int]:
        """Programs to launch: a tile each, or (persistent) at most ``programs`` (the SMs) looping over them."""
        tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
        return (min(tiles, programs) if persistent and programs > 0 else tiles,)

    def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
        """Triton's allocator for the device-side descriptors' global scratch: the caching allocator on the
        current device and stream (torch's blocks are 512-byte aligned), so CUDA graph capture records it."""
        return torch.empty(size, dtype=torch.int8, device="cuda")

    try:     # Triton's allocator (a ContextVar in 3.6 and 3.8) and its "none set" value; private, hence guarded
        from triton.runtime._allocation import NullAllocator as _NullAllocator, _allocator as _set_allocator
    except ImportError:
        _NullAllocator = _set_allocator = None

    def _ensure_allocator() -> None:
        """Sets ``_scratch`` as Triton's allocator where none is set (in this thread's context: a ContextVar),
        never replacing one the caller set (where Triton's private state cannot be read: always sets it)."""
        if _set_allocator is None or isinstance(_set_allocator.get(), _NullAllocator):
            triton.set_allocator(_scratch)

    def _tma_aligned(t: torch.Tensor) -> torch.Tensor:
        """``t`` (rows, K) with 16-byte aligned start and row stride, copied where not (TMA's requirement)."""
        if t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0:
            return t
        return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)

    @torch.library.custom_op("tessera::fused_swiglu", mutates_args=())
    def _fused_swiglu_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        M, K = x.shape
        N = weight.shape[0] // 2
        if x.stride(1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M > 0:
            with on_device(x):
                programs = 0
                if x.is_cuda and tma_ok(N, K):       # the autotuner may pick a TMA config
                    x, weight = _tma_aligned(x), _tma_aligned(weight)
                    programs = _sm_count(x.device.index)
                    _ensure_allocator()
                _tuned_kernel[lambda meta: grid(M, N, meta["BM"], meta["BN"], meta["PERSISTENT"], programs)](
                    x, weight, out, M, N, K, x.stride(0), out.stride(0), m_bucket(M))
        return out

    @_fused_swiglu_op.register_fake
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0] // 2)
