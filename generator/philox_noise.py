"""PyTorch's own CUDA Exp(1) noise, computed where a kernel needs it instead of read from memory (NOTES A46).

``tensor.exponential_(generator=g)`` on CUDA is a fixed function of g's (seed, offset) and the tensor's size.
ATen's ``distribution_nullary_kernel`` launches G = min(SMs * (threads per SM / 256), ceil(n / 256)) blocks of
256 threads, T = 256 G threads in all. Thread t runs curand's Philox4x32-10 with key = seed, counter
(offset / 4 + k, subsequence t): its k-th call gives four 32-bit words x, for the elements
li = (4k + w) T + t, w = 0..3 (li < n). Each word becomes u = x 2^-32 + 2^-33 in (0, 1] (``curand_uniform4``)
and then E = -log u, or 2^-24 where u >= 1 - 2^-24 (ATen's ``transformation::exponential``; its log is CUDA's fast
``__logf``, lg2.approx x ln 2: libdevice's ``fast_logf`` gives every number bit for bit on an H100, the accurate logf
leaves ~85% of them an ulp or a few off). The generator's offset then moves on by 4 ceil(n / 4T): the ``increment``.

So a kernel can make element li of that tensor from (seed, offset) alone, and read none of it from memory:
``fused_draw.noise_draw`` makes the masked sampler's (B, L, V) noise at the rows it draws (a (B, L, V) float32
tensor per step, 1.07 GB at masked-B's batch 64, is never written), and ``exponential`` below makes the same
numbers as ``exponential_`` into a tensor. Both read (seed, offset) from a device tensor (``NoiseStream``), so a
call replayed as a CUDA graph draws from the generator state of the replay, and the caller moves the generator
on by what the draws took (``advance``): the generator ends where ``exponential_`` would have left it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from generator.launch import INTERPRETED, on_device

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:   # CPU-only installs: nothing here runs without CUDA
    triton = None

THREADS_PER_BLOCK = 256     # ATen's block_size_bound for distributions
WORDS_PER_CALL = 4          # curand_uniform4: one Philox call gives four float32 draws (curand4_engine_calls)
INT32_LIMIT = 2**31 - 1     # past it ATen splits the draw into 32-bit-indexable pieces: another layout


@dataclass(frozen=True)
class Layout:
    """Where ``exponential_`` of n elements takes each number (see the module's docstring): ``threads`` T,
    ``calls`` per thread (ceil(n / 4T)); ``increment`` = 4 calls, what the draw moves the offset by."""
    threads: int
    calls: int

    @property
    def increment(self) -> int:
        return WORDS_PER_CALL * self.calls


@functools.lru_cache(maxsize=None)
def _blocks_cap(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count * (props.max_threads_per_multi_processor // THREADS_PER_BLOCK)


def layout_for(numel: int, blocks_cap: int) -> Layout:
    """``exponential_``'s layout for ``numel`` elements on a device running at most ``blocks_cap`` blocks of 256
    threads at once (SMs x threads per SM / 256: 132 x 8 on an H100)."""
    if numel < 1:
        raise ValueError(f"no elements to draw ({numel})")
    blocks = min(blocks_cap, -(-numel // THREADS_PER_BLOCK))
    threads = THREADS_PER_BLOCK * blocks
    return Layout(threads, -(-numel // (WORDS_PER_CALL * threads)))


def device_layout(numel: int, device: torch.device) -> Layout:
    """``layout_for`` on ``device`` (CUDA)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return layout_for(numel, _blocks_cap(index))


def matches_torch(numel: int) -> bool:
    """Whether ATen draws ``numel`` elements in one launch (32-bit indexing), the layout this module follows."""
    return 0 < numel <= INT32_LIMIT


def state_of(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(2,) int64 on ``device``: the CUDA generator's seed (its 64 bits) and Philox offset, now."""
    seed = generator.initial_seed()
    seed = seed - 2**64 if seed >= 2**63 else seed
    return torch.tensor([seed, generator.get_offset()], dtype=torch.int64).to(device, non_blocking=True)


def advance(generator: torch.Generator, increment: int) -> None:
    """Move ``generator`` on by ``increment`` (the draws a ``NoiseStream`` made from its state)."""
    generator.set_offset(generator.get_offset() + increment)


class NoiseStream:
    """Draws from a CUDA generator's state held on the device (``state``, from ``state_of``), in order: each draw
    starts at the state's offset plus what the draws before it ``taken`` (a host int, the same at every replay of a
    recorded call), so a replay reads the state its caller copied in. ``blocks_cap``: the device's (``layout_for``),
    read from the state's CUDA device when None (tests on Triton's CPU interpreter pass one)."""

    def __init__(self, state: torch.Tensor, blocks_cap: int | None = None):
        self.state = state
        self.taken = 0
        self.blocks_cap = blocks_cap

    def layout(self, numel: int) -> Layout:
        if self.blocks_cap is not None:
            return layout_for(numel, self.blocks_cap)
        return device_layout(numel, self.state.device)

    def take(self, numel: int) -> tuple[Layout, int]:
        """The layout of the next ``exponential_`` of ``numel`` elements and the offset it starts at (past the
        state's): the draw is taken."""
        layout = self.layout(numel)
        start, self.taken = self.taken, self.taken + layout.increment
        return layout, start


def exponential(shape, stream: NoiseStream) -> torch.Tensor:
    """float32 ``shape``: the numbers ``torch.empty(shape).exponential_(generator=g)`` draws on CUDA from the state
    ``stream`` stands at (bit for bit), taken from it."""
    numel = math.prod(shape)
    if not matches_torch(numel):
        raise ValueError(f"{numel} elements: ATen draws these in pieces, a layout this kernel does not follow")
    layout, start = stream.take(numel)
    out = torch.empty(shape, dtype=torch.float32, device=stream.state.device)
    block = 256
    with on_device(out):
        _exponential_kernel[(triton.cdiv(layout.threads, block), layout.calls)](
            out, stream.state, start, numel, layout.threads, BLOCK=block, num_warps=4)
    return out


if triton is not None:
    # libdevice's fast_logf is ATen's log here (measured: every number of exponential_ bit for bit); Triton's CPU
    # interpreter has no libdevice (numpy's log there)
    LIBDEVICE_LOG = tl.constexpr(not INTERPRETED)

    @triton.jit
    def curand_words(seed, offset, call, thread):
        """The four 32-bit words (uint32 blocks) of curand's k-th ``curand4`` (k = ``call``) for Philox4x32-10
        initialised with (seed, subsequence = ``thread``, offset), i.e. counter (offset / 4 + k, thread)."""
        counter = offset // 4 + call                            # int64: the counter's low 64 bits
        t = thread.to(tl.uint32)
        zero = t * 0
        lo = (counter & 0xFFFFFFFF).to(tl.uint32)
        hi = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
        return tl.philox(seed, zero + lo, zero + hi, t, zero)

    @triton.jit
    def torch_exponential(word):
        """ATen's Exp(1) of one word: u = curand_uniform's x 2^-32 + 2^-33, then -log u (``__logf``, as ATen's CUDA
        build computes it), or 2^-24 where u >= 1 - 2^-24."""
        u = word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
        if LIBDEVICE_LOG:
            log_u = libdevice.fast_logf(u)
        else:
            log_u = tl.log(u)
        return tl.where(u >= 0.99999994039535522, 5.9604644775390625e-08, -log_u)

    @triton.jit
    def _exponential_kernel(OUT, STATE, START, N, T, BLOCK: tl.constexpr):
        call = tl.program_id(1).to(tl.int64)
        thread = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(STATE)
        offset = tl.load(STATE + 1) + START
        x0, x1, x2, x3 = curand_words(seed, offset, call, thread)
        li = call * 4 * T + thread                              # word w: li + w T
        live = thread < T
        tl.store(OUT + li, torch_exponential(x0), mask=live & (li < N))
        tl.store(OUT + li + T, torch_exponential(x1), mask=live & (li + T < N))
        tl.store(OUT + li + 2 * T, torch_exponential(x2), mask=live & (li + 2 * T < N))
        tl.store(OUT + li + 3 * T, torch_exponential(x3), mask=live & (li + 3 * T < N))
