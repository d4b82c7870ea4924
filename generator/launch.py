"""What every Triton launch in generator/ shares: Triton launches on the *current* CUDA device, so each op
makes its tensors' device current first (a model on cuda:1 would otherwise launch on cuda:0 with pointers
into cuda:1's memory); and the kernels compute element offsets in int32, so each op falls back to its torch
path for tensors too large for that (``int32_offsets``)."""
from __future__ import annotations

import contextlib
import os

import torch

# Triton's CPU interpreter (TRITON_INTERPRET=1, read by triton at import): the kernels' tests run there, on the
# first config only, and launch options the interpreter has no use for (register caps) are left out
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def on_device(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is current (nothing for CPU tensors: the Triton interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# the kernels' offsets (program id x stride + lane) are int32; a tile of slack past the last element
INT32_OFFSET_LIMIT = 2**31 - 2**20


def int32_offsets(*tensors: torch.Tensor) -> bool:
    """Whether every element offset of these tensors (views: their strides) fits the kernels' int32
    arithmetic. Past it (e.g. masked-B's qkv beyond ~1800 images under CFG) the ops run their torch path."""
    return all(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) < INT32_OFFSET_LIMIT for t in tensors)
