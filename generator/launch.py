"""What every Triton launch in generator/ shares: Triton launches on the *current* CUDA device, so each op
makes its tensors' device current first (a model on cuda:1 would otherwise launch on cuda:0 with pointers
into cuda:1's memory); and the kernels compute element offsets in int32, so each op falls back to its torch
path for tensors too large for that (``int32_offsets``); a kernel replacing a Linear runs where F.linear would
compute in bf16/fp16 (``linear_in_half``). Also the process setting for cuBLAS's matmul launches that the
sampling commands make (``prefer_static_matmul_schedules``)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import MutableMapping

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


HALF_DTYPES = (torch.bfloat16, torch.float16)


def linear_in_half(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` computes in the weight's dtype and that is bf16 or fp16: x's own dtype, or
    CUDA autocast's dtype (x float32 or half) when autocast is on. What a kernel replacing a Linear must match."""
    if weight.dtype not in HALF_DTYPES:
        return False
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda") == weight.dtype and x.dtype in (torch.float32, *HALF_DTYPES)
    return x.dtype == weight.dtype


# cuBLAS with no workspace (NOTES A45): PyTorch hands cuBLAS a workspace (CUBLAS_WORKSPACE_CONFIG; cuBLASLt's
# CUBLASLT_WORKSPACE_SIZE, in KiB), and with one cuBLAS picks Hopper matmul kernels whose tile scheduler keeps
# counters there, zeroed by a memset before every matmul: 776 per masked-B @16 call, each a dependency gap in a
# CUDA graph. Without one it picks the statically scheduled kernels of the same tiles: the same sums in the same
# order, a seed's ids unchanged
STATIC_MATMUL_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}


def prefer_static_matmul_schedules(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set ``STATIC_MATMUL_ENV``'s variables that ``environ`` lacks (a value already there, the user's, stays) and
    return the ones set. PyTorch reads them once, at the process's first cuBLAS call: call this before it (the
    sampling commands do, for a masked generator). A process-wide setting, so the library never sets it on
    import or load."""
    missing = {k: v for k, v in STATIC_MATMUL_ENV.items() if k not in environ}
    environ.update(missing)
    return missing
