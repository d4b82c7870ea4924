"""What every Triton launch in generator/ shares: Triton launches on the *current* CUDA device, so each op
makes its tensors' device current first (a model on cuda:1 would otherwise launch on cuda:0 with pointers
into cuda:1's memory); and the kernels compute element offsets in int32, so each op falls back to its torch
path for tensors too large for that (``int32_offsets``); a kernel replacing a Linear runs where F.linear would
compute in bf16/fp16 (``linear_in_half``); the decoding step's chain of small kernels launches each one while
the one before it finishes (``pdl_launch``). Also the process setting for cuBLAS's matmul launches that the
sampling commands make (``prefer_static_matmul_schedules``)."""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import MutableMapping

import torch

try:        # grid dependency control, for programmatic dependent launch (Triton >= 3.4 on CUDA)
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    PDL_SUPPORTED = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:                     # no Triton (CPU installs), or one without it
    gdc_launch_dependents = gdc_wait = None
    PDL_SUPPORTED = False

# Triton's CPU interpreter (TRITON_INTERPRET=1, read by triton at import): the kernels' tests run there, on the
# first config only, and launch options the interpreter has no use for (register caps) are left out
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def env_launch_config(variable: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel's launch from the environment variable ``variable`` (comma-separated ints, as many as ``default``:
    a tuning sweep's override), else ``default``. The first (rows: a block's extent) a power of two."""
    value = os.environ.get(variable)
    if not value:
        return default
    try:
        config = tuple(int(v) for v in value.split(","))
    except ValueError:
        config = ()
    if len(config) != len(default) or min(config) < 1 or config[0] & (config[0] - 1):
        raise ValueError(f"{variable}={value!r}: {len(default)} positive integers, the first a power of two")
    return config


def on_device(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is current (nothing for CPU tensors: the Triton interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# programmatic dependent launch of the cached decoding step's kernels (matvec, decode_attention; NOTES A57): a kernel
# launched with it may start while the kernel before it runs; it loads what no kernel writes (its weights) first and
# waits (``gdc_wait``) for the kernel before it to end before it reads or writes anything else. It lets the next
# one start (``gdc_launch_dependents``) after its wait (one kernel ahead), or with ``PDL_TRIGGER_FIRST`` as it
# begins (as far ahead as the SMs hold the waiting kernels): slower (H100, 24 AR-B blocks: 22.4 vs 21.9 us a
# block; 23.9 without PDL). TESSERA_PDL=0 turns it off
PDL = os.environ.get("TESSERA_PDL", "1") != "0"
PDL_TRIGGER_FIRST = False


def pdl_launch(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t``'s device launches with programmatic dependent launch: ``PDL``, a Triton that has
    it, and a CUDA device of compute capability 9 or more (Hopper)."""
    return PDL and PDL_SUPPORTED and t.is_cuda and _major_capability(t.device.index) >= 9


def pdl_kwargs(t: torch.Tensor) -> dict:
    """A decoding kernel's launch arguments for PDL on ``t``'s device: its ``PDL`` and ``TRIGGER_FIRST``
    constexprs, and Triton's ``launch_pdl`` option only when on (a Triton without the option rejects the key)."""
    pdl = pdl_launch(t)
    return {"PDL": pdl, "TRIGGER_FIRST": PDL_TRIGGER_FIRST, **({"launch_pdl": True} if pdl else {})}


@functools.cache
def _major_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


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
