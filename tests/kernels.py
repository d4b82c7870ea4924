"""Where the Triton kernel tests run: on CUDA, or on Triton's CPU interpreter when TRITON_INTERPRET=1 is set
before triton is imported (``make test``'s second pass); elsewhere they skip."""
import pytest
import torch

from generator.launch import INTERPRETED     # TRITON_INTERPRET=1: Triton's CPU interpreter

try:
    import triton
except ImportError:   # CPU-only installs
    triton = None

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if INTERPRETED else None
needs_kernel = pytest.mark.skipif(triton is None or KERNEL_DEVICE is None,
                                  reason="the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on the CPU)")
# the half-precision dtype the kernels' matmul tests use: the interpreter's bfloat16 matmuls are wrong
KERNEL_DTYPE = torch.bfloat16 if KERNEL_DEVICE == "cuda" else torch.float16
needs_compiler = pytest.mark.skipif(triton is None or INTERPRETED,
                                    reason="compiles with Triton's real compiler (the interpreter runs Python)")


def assert_compiled_grads_match(fn, tensors) -> None:
    """``fn(*tensors)`` (a scalar) and its gradients through torch.compile with AOT autograd (backend aot_eager,
    fullgraph) equal the eager call's: an op's fake implementation and autograd formula hold up under tracing."""
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    grads = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with torch.enable_grad():
            f(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def compile_for_hopper(fn, signature: dict, constexprs: dict, attrs: dict | None = None, **options):
    """``fn`` through Triton's real compiler down to sm_90 PTX and cubin, with no GPU (it rejects what the
    interpreter lets pass); ``attrs``: the JIT's hints (e.g. divisibility) per argument index."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    source = ASTSource(fn, signature, constexprs) if attrs is None else ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
