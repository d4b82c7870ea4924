"""What every Triton launch in generator/ shares: Triton launches on the *current* CUDA device, so each op
makes its tensors' device current first (a model on cuda:1 would otherwise launch on cuda:0 with pointers
into cuda:1's memory)."""
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
