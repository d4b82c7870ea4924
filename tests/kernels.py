"""Where the Triton kernel tests run: on CUDA, or on Triton's CPU interpreter when TRITON_INTERPRET=1 is set
before triton is imported (``make test``'s second pass); elsewhere they skip."""
import os

import pytest
import torch

try:
    import triton
except ImportError:   # CPU-only installs
    triton = None

KERNEL_DEVICE = ("cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("TRITON_INTERPRET") == "1"
                 else None)
needs_kernel = pytest.mark.skipif(triton is None or KERNEL_DEVICE is None,
                                  reason="the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on the CPU)")
# the half-precision dtype the kernels' matmul tests use: the interpreter's bfloat16 matmuls are wrong
KERNEL_DTYPE = torch.bfloat16 if KERNEL_DEVICE == "cuda" else torch.float16
