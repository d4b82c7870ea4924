"""qk-norm + RoPE as one op for training forwards, from the qkv projection's output (generator/fused_qk_rope.py):
the forward against the formula, the backward kernel against float64 autograd through it and against the torch ops'
backward, and Attention's training path with and without it. The kernels run on CUDA, or on Triton's CPU
interpreter with TRITON_INTERPRET=1 set before the import."""
import pytest
import torch

from generator import fused_qk_rope as fq
from generator.transformer import Attention, rope_tables
from tests.kernels import (KERNEL_DEVICE, KERNEL_DTYPE, assert_compiled_grads_match, compile_for_hopper,
                           needs_compiler, needs_kernel)

EPS = 1e-6


def inputs(B, L, H, K, seed=0, dtype=KERNEL_DTYPE):
    """q and k as the unbound views of one (B, L, 3, H, K) projection output (row stride 3 H K), weights near 1,
    RoPE tables of L positions."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, L, 3, H, K, generator=g) * 2).to(KERNEL_DEVICE, dtype)
    wq, wk = (1 + torch.randn(2, K, generator=g) * 0.2).to(KERNEL_DEVICE).unbind(0)
    cos, sin = (t.to(KERNEL_DEVICE) for t in rope_tables(torch.arange(L) * 0.7, K))
    return qkv, wq, wk, cos, sin


@needs_kernel
@pytest.mark.parametrize("B, L, H, K", [(2, 7, 3, 16), (1, 37, 4, 64), (3, 5, 2, 32)])
def test_forward_equals_the_formula(B, L, H, K):
    """q' and k' = RoPE(rms_norm(x) w) per head in float32, rounded once, contiguous; v' = v exactly, contiguous;
    rstd = rsqrt(mean(x^2) + eps). Row counts that do not fill the last program (ragged) included."""
    qkv, wq, wk, cos, sin = inputs(B, L, H, K)
    q_out, k_out, v_out, rstd = torch.ops.tessera.qkv_norm_rope(qkv, wq, wk, cos, sin, EPS)
    for got in (q_out, k_out, v_out):
        assert got.shape == (B, L, H, K) and got.dtype == qkv.dtype and got.is_contiguous()
    for got, x, w in ((q_out, qkv[:, :, 0], wq), (k_out, qkv[:, :, 1], wk)):
        want = fq.reference(x, w, EPS, cos, sin)
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(qkv.dtype).eps, atol=1e-3)
    assert torch.equal(v_out, qkv[:, :, 2])
    xs = qkv[:, :, :2].movedim(2, 0).float()
    torch.testing.assert_close(rstd, torch.rsqrt(xs.pow(2).mean(-1) + EPS), rtol=1e-5, atol=1e-6)


def output_grads(B, L, H, K, seed, dtype=torch.float32, transposed=False):
    """dq', dk', dv' (B, L, H, K); ``transposed``: each a (B, H, L, K)-contiguous tensor's view, as SDPA may hand
    them back."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        return [t.to(KERNEL_DEVICE, dtype).transpose(1, 2) for t in torch.randn(3, B, H, L, K, generator=g).unbind(0)]
    return [t.to(KERNEL_DEVICE, dtype) for t in torch.randn(3, B, L, H, K, generator=g).unbind(0)]


@needs_kernel
@pytest.mark.parametrize("B, L, H, K", [(2, 9, 3, 16), (1, 21, 2, 64)])
def test_backward_equals_autograd_through_the_formula(B, L, H, K):
    """The qkv gradient (q's and k's parts and v's) and both weights' gradients against float64 autograd through
    ``reference``: RoPE's backward is the opposite rotation, then RMSNorm's; v's is its output's gradient."""
    qkv, wq, wk, cos, sin = inputs(B, L, H, K, seed=1, dtype=torch.float32)
    grads = output_grads(B, L, H, K, seed=2)
    leaves = [t.detach().clone().requires_grad_() for t in (qkv, wq, wk)]
    with torch.enable_grad():
        outs = fq.qkv_norm_rope(*leaves, EPS, cos, sin)
        torch.autograd.backward(outs, grads)
    ref = [t.detach().double().requires_grad_() for t in (qkv, wq, wk)]
    with torch.enable_grad():
        rq = fq.reference(ref[0][:, :, 0], ref[1], EPS, cos.double(), sin.double())
        rk = fq.reference(ref[0][:, :, 1], ref[2], EPS, cos.double(), sin.double())
        torch.autograd.backward([rq, rk, ref[0][:, :, 2]], [g.double() for g in grads])
    for name, leaf, want in zip(["qkv", "q weight", "k weight"], leaves, ref):
        got = leaf.grad
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-4 * want.grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert torch.equal(leaves[0].grad[:, :, 2], grads[2])       # v's gradient passes through as it came


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
def test_backward_kernel_equals_the_torch_ops(transposed):
    """The backward op's qkv and weight gradients equal ``backward_torch``'s (the path with BACKWARD_KERNEL off) in
    half precision, to its rounding, with the gradients laid out (B, L, H, K) or as (B, H, L, K) transposes; the
    launch (rows a program) changes only the float32 sums' order."""
    B, L, H, K = 2, 11, 4, 32
    qkv, wq, wk, cos, sin = inputs(B, L, H, K, seed=5)
    rstd = torch.ops.tessera.qkv_norm_rope(qkv, wq, wk, cos, sin, EPS)[3]
    grads = output_grads(B, L, H, K, seed=6, dtype=qkv.dtype, transposed=transposed)
    want = fq.backward_torch(*grads, qkv, wq, wk, cos, sin, rstd)
    for config in (None, (1, 1), (16, 2)):
        got = fq._backward(*grads, qkv, wq, wk, cos, sin, rstd, config=config)
        assert got[0].shape == qkv.shape and got[0].dtype == qkv.dtype and got[0].is_contiguous()
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2 * torch.finfo(qkv.dtype).eps, atol=1e-3)
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_every_launch_gives_the_same_values(rows):
    """Any rows per program computes the same values: each row is on its own, but the launch's layout sets the order
    of a row's sum of squares (on the GPU the bits of rstd can move, and so the last bit of an output)."""
    qkv, wq, wk, cos, sin = inputs(2, 13, 3, 32, seed=3)
    want = fq._forward(qkv, wq, wk, cos, sin, EPS)
    got = fq._forward(qkv, wq, wk, cos, sin, EPS, config=(rows, 2))
    torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=0)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a.float(), b.float(), rtol=torch.finfo(a.dtype).eps, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("backward_kernel", [True, False])
def test_attention_training_path_matches_the_torch_ops(monkeypatch, backward_kernel):
    """Attention.forward with autograd on runs the op; its output and every gradient match the torch ops' path
    (ENABLED off) to float32 rounding (no autocast here), with a bool mask and with VAR's grouped BlockCausal,
    with the op's backward as the kernel and as torch ops."""
    from generator.transformer import BlockCausal
    torch.manual_seed(0)
    B, L, D, H = 2, 14, 64, 4
    attn = Attention(D, H, qk_norm=True).to(KERNEL_DEVICE)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    bounds = [0, 1, 5, 14]
    level = torch.repeat_interleave(torch.arange(3), torch.tensor([1, 4, 9]))
    mask_LL = (level[None, :] <= level[:, None]).to(KERNEL_DEVICE)
    cos, sin = (t.to(KERNEL_DEVICE) for t in rope_tables(torch.arange(L), D // H))
    x = torch.randn(B, L, D).to(KERNEL_DEVICE)
    monkeypatch.setattr(fq, "BACKWARD_KERNEL", backward_kernel)
    for mask in (mask_LL, BlockCausal.from_bounds(bounds, mask_LL, 9)):
        runs = []
        for enabled in (True, False):
            monkeypatch.setattr(fq, "ENABLED", enabled)
            attn.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            assert fq.use_kernel(xi.view(B, L, 1, H, D // H).expand(B, L, 3, H, D // H), attn.q_norm,
                                 attn.k_norm) == enabled
            out = attn(xi, cos, sin, mask_LS=mask)
            out.square().sum().backward()
            runs.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}))
        (o1, dx1, g1), (o0, dx0, g0) = runs
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-5)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_kernel
@pytest.mark.parametrize("backward_kernel", [True, False])
def test_the_op_traces_under_torch_compile(monkeypatch, backward_kernel):
    """The fake implementations and the autograd formula (the backward op or the torch ops) under AOT autograd
    (backend aot_eager): the compiled forward and backward give what the eager op does."""
    monkeypatch.setattr(fq, "BACKWARD_KERNEL", backward_kernel)
    qkv, wq, wk, cos, sin = inputs(2, 9, 2, 32, seed=4, dtype=torch.float32)

    def fn(qkv, wq, wk):
        q, k, v = fq.qkv_norm_rope(qkv, wq, wk, EPS, cos, sin)
        return (q * k).sum() + (q * v).sum()
    assert_compiled_grads_match(fn, (qkv, wq, wk))


def test_no_kernel_without_autograd_identity_norms_or_when_off(monkeypatch):
    """The sampler's no-grad forwards keep the torch ops (their outputs unchanged); so do models without qk-norm
    and ENABLED off. A mismatched table is an error that names the shapes."""
    attn = Attention(32, 2, qk_norm=True)
    qkv = torch.randn(1, 4, 3, 2, 16, device=KERNEL_DEVICE or "cpu")
    with torch.no_grad():
        assert not fq.use_kernel(qkv, attn.q_norm, attn.k_norm)
    plain = Attention(32, 2, qk_norm=False)
    assert not fq.use_kernel(qkv, plain.q_norm, plain.k_norm)
    monkeypatch.setattr(fq, "ENABLED", False)
    assert not fq.use_kernel(qkv, attn.q_norm, attn.k_norm)
    if fq.triton is not None and KERNEL_DEVICE is not None:
        cos, sin = rope_tables(torch.arange(5), 16)
        with pytest.raises(ValueError, match="RoPE tables"):
            torch.ops.tessera.qkv_norm_rope(qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, EPS)


@needs_compiler
def test_kernels_compile_for_hopper():
    """Triton's real front end and sm_90 back end accept both kernels at VAR's head size."""
    strides = {name: "i32" for name in ("s_b", "s_l", "s_3", "s_h")}
    sig = {"X": "*bf16", "W0": "*fp32", "W1": "*fp32", "COS": "*fp32", "SIN": "*fp32", "O0": "*bf16", "O1": "*bf16",
           "O2": "*bf16", "RSTD": "*fp32", "n_rows": "i32", "L": "i32", "H": "i32", **strides, "eps": "fp32",
           "F_": "constexpr", "ROWS_": "constexpr"}
    k = compile_for_hopper(fq._qkv_forward_kernel, sig, dict(F_=32, ROWS_=fq.ROWS), num_warps=fq.WARPS)
    assert k.asm["cubin"]
    grads = {f"g{i}_{a}": "i32" for i in range(3) for a in "blh"}
    sig = {"G0": "*bf16", "G1": "*bf16", "G2": "*bf16", "X": "*bf16", "W0": "*fp32", "W1": "*fp32", "COS": "*fp32",
           "SIN": "*fp32", "RSTD": "*fp32", "DX": "*bf16", "PART": "*fp32", "n_rows": "i32", "L": "i32", "H": "i32",
           **grads, **strides, "F_": "constexpr", "ROWS_": "constexpr"}
    k = compile_for_hopper(fq._qkv_backward_kernel, sig, dict(F_=32, ROWS_=fq.BACKWARD_ROWS),
                           num_warps=fq.BACKWARD_WARPS)
    assert k.asm["cubin"]
