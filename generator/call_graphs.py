"""Whole sampling calls recorded as one CUDA graph each (NOTES A39).

``torch.compile(mode="reduce-overhead")`` records a forward's kernels as a CUDA graph, but a sampling call
still runs its host work before the first kernel and launches the small kernels between the forwards one
by one (a masked step's noise, masked positions, scheduled counts and concatenations: ~25 per step), each
after a gap the GPU waits through. ``CallGraphs`` records the whole call, every step, as one graph, so a
replay runs the call's kernels back to back.

- The first call of a key runs as it is: it compiles, and Triton autotunes (timing runs that a capture
  could not hold). The second records the graph and replays it; later calls replay it.
- Random draws: the call is recorded with a private CUDA generator registered with the graph. A replay
  starts it at the caller's generator state and leaves the caller's generator where the call run without a
  graph leaves it: CUDA's philox draws read (seed, offset) from the graph's own tensors at replay, with the
  offsets of the eager draws, so the numbers are the same.
- The key: the caller's (its static options) plus every input's shape and dtype, the autocast state, and the
  storage of the module's parameters and buffers, since a graph reads the memory it was recorded with (a
  module moved or re-cast records again; an in-place update such as ``load_state_dict`` is read as is).
- The graphs share one memory pool; each replay's output is copied out before anything else runs, so a
  graph may reuse the memory of another's intermediates and outputs.
- A capture that fails (an op that syncs with the host, say) warns once and runs calls without graphs.

Used by ``MaskedGenerator.sample(compile=True)`` on CUDA (``generator.masked.CALL_GRAPHS``).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Hashable

import torch
import torch.nn as nn

from generator.sampling import cuda_generator

Inputs = tuple  # of tensors or None


def storage_key(module: nn.Module, skip: type | tuple[type, ...] = ()) -> tuple:
    """Where the module's parameters and buffers live and their dtypes: a graph's replays read these addresses
    (a cast or a move makes new storage; a new shape too). Submodules of a ``skip`` type are left out (scratch
    such as KV caches, remade per call). Walks the modules' own dicts with plain loops: ~60 us for masked-B on a
    CPU core (``module.parameters()`` and ``buffers()``: ~270 us), 2-4x that inside a sampling call right after
    a synchronize (NOTES A42). Recomputed each call: a cached list of slots would not see a deleted submodule."""
    key, stack = [], [module]
    append, pop, extend = key.append, stack.pop, stack.extend
    while stack:
        m = pop()
        if m is None or (skip and isinstance(m, skip)):
            continue
        for t in m._parameters.values():
            if t is not None:
                append((t.data_ptr(), t.dtype))
        for t in m._buffers.values():
            if t is not None:
                append((t.data_ptr(), t.dtype))
        extend(m._modules.values())
    return tuple(key)


def inputs_key(inputs: Inputs) -> tuple:
    return tuple(None if x is None else (tuple(x.shape), x.dtype, x.device) for x in inputs)


def autocast_key(device_type: str = "cuda") -> tuple:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class RecordedCall:
    """``fn(*inputs, generator)`` recorded once as a CUDA graph on copies of ``inputs``; ``replay`` runs it on
    new inputs of the same shapes with the caller's generator (see the module's docstring)."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Inputs, device: torch.device, pool):
        self.inputs = tuple(None if x is None else x.clone() for x in inputs)
        self.generator = torch.Generator(device)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        # cuBLAS keys its workspace on the stream: drop the ones made outside, and the one the capture makes in
        # the graph's pool, as cudagraph trees do (a workspace left in a freed pool faulted: NOTES A12)
        torch._C._cuda_clearCublasWorkspaces()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = fn(*self.inputs, self.generator)
        finally:
            torch._C._cuda_clearCublasWorkspaces()

    def replay(self, inputs: Inputs, generator: torch.Generator) -> torch.Tensor:
        for static, x in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(x)
        self.generator.set_state(generator.get_state())
        self.graph.replay()
        generator.set_state(self.generator.get_state())    # advanced by the draws the call made
        return self.output.clone()


class CallGraphs:
    """One CUDA graph per key of a call (see the module's docstring); at most ``max_graphs`` kept: past that,
    all are dropped and recorded again as calls come. ``record`` builds a graph (``RecordedCall``; tests on
    the CPU pass a stand-in)."""

    def __init__(self, what: str, log: logging.Logger, max_graphs: int = 8, record=RecordedCall):
        self.what, self.log, self.max_graphs, self.record = what, log, max_graphs, record
        self.failed = False
        self.replay_started_at: float | None = None   # time.perf_counter() as the last replay began (NOTES A42)
        self._seen: set = set()
        self._graphs: dict = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo) -> "CallGraphs":
        # a copy (e.g. an EMA) records its own: graphs read the original's memory, and CUDA graphs do not copy
        return CallGraphs(self.what, self.log, self.max_graphs, self.record)

    def __call__(self, fn: Callable[..., torch.Tensor], key: Hashable, module: nn.Module, inputs: Inputs,
                 generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``fn(*inputs, generator)``: run as is, or recorded and replayed (``generator`` None: the device's
        default CUDA generator, advanced as the call would advance it)."""
        if self.failed:
            return fn(*inputs, generator)
        generator = cuda_generator(generator, device)
        key = (key, inputs_key(inputs), autocast_key(device.type), storage_key(module))
        recorded = self._graphs.get(key)
        if recorded is None:
            if key not in self._seen:           # first call: compiles and autotunes outside any capture
                if len(self._seen) >= 4 * self.max_graphs:
                    self._seen.clear()
                self._seen.add(key)
                return fn(*inputs, generator)
            if len(self._graphs) >= self.max_graphs:
                self._graphs.clear()
                self._pool = None
            try:
                if self._pool is None and device.type == "cuda":
                    self._pool = torch.cuda.graph_pool_handle()
                recorded = self._graphs[key] = self.record(fn, inputs, device, self._pool)
            except Exception as e:   # noqa: BLE001 - any capture failure -> calls without graphs, as before
                self.log.warning("recording the %s as a CUDA graph failed (%s: %s); running calls without one",
                                 self.what, type(e).__name__, e)
                self.failed = True
                self._graphs.clear()
                return fn(*inputs, generator)
        self.replay_started_at = time.perf_counter()
        return recorded.replay(inputs, generator)
