"""qk-norm + RoPE as one op for training forwards (generator/fused_qk_rope.py): the forward against the formula,
the backward against float64 autograd through it, and Attention's training path with and without it. The kernel
runs on CUDA, or on Triton's CPU interpreter with TRITON_INTERPRET=1 set before the import."""
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
    """q' and k' = RoPE(rms_norm(x) w) per head in float32, rounded once, contiguous; rstd = rsqrt(mean(x^2) + eps).
    Row counts that do not fill the last program (ragged) included."""
    qkv, wq, wk, cos, sin = inputs(B, L, H, K)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    q_out, k_out, rstd = torch.ops.tessera.qk_norm_rope(q, k, wq, wk, cos, sin, EPS)
    for got, x, w in ((q_out, q, wq), (k_out, k, wk)):
        assert got.shape == (B, L, H, K) and got.dtype == qkv.dtype and got.is_contiguous()
        want = fq.reference(x, w, EPS, cos, sin)
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(qkv.dtype).eps, atol=1e-3)
    xs = torch.stack([q, k]).float()
    torch.testing.assert_close(rstd, torch.rsqrt(xs.pow(2).mean(-1) + EPS), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("B, L, H, K", [(2, 9, 3, 16), (1, 21, 2, 64)])
def test_backward_equals_autograd_through_the_formula(B, L, H, K):
    """dq, dk and both weights' gradients against float64 autograd through ``reference``: RoPE's backward is the
    opposite rotation, then RMSNorm's."""
    qkv, wq, wk, cos, sin = inputs(B, L, H, K, seed=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    dq_out, dk_out = (torch.randn(2, B, L, H, K, generator=g)).to(KERNEL_DEVICE).unbind(0)
    leaves = [t.detach().clone().requires_grad_() for t in (qkv, wq, wk)]
    with torch.enable_grad():
        qkv_, wq_, wk_ = leaves
        q_out, k_out = fq.qk_norm_rope(qkv_[:, :, 0], qkv_[:, :, 1], wq_, wk_, EPS, cos, sin)
        torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    ref = [t.detach().double().requires_grad_() for t in (qkv, wq, wk)]
    with torch.enable_grad():
        rq = fq.reference(ref[0][:, :, 0], ref[1], EPS, cos.double(), sin.double())
        rk = fq.reference(ref[0][:, :, 1], ref[2], EPS, cos.double(), sin.double())
        torch.autograd.backward([rq, rk], [dq_out.double(), dk_out.double()])
    for name, leaf, want in zip(["qkv", "q weight", "k weight"], leaves, ref):
        got = leaf.grad
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, name
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-4 * want.grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert leaves[0].grad[:, :, 2].abs().max() == 0        # v is not an input of the op


@needs_kernel
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_every_launch_gives_the_same_values(rows):
    """Any rows per program computes the same values: each row is on its own, but the launch's layout sets the order
    of a row's sum of squares (on the GPU the bits of rstd can move, and so the last bit of an output)."""
    qkv, wq, wk, cos, sin = inputs(2, 13, 3, 32, seed=3)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    want = fq._forward(q, k, wq, wk, cos, sin, EPS)
    got = fq._forward(q, k, wq, wk, cos, sin, EPS, config=(rows, 2))
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=0)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=torch.finfo(a.dtype).eps, atol=1e-3)


@needs_kernel
def test_attention_training_path_matches_the_torch_ops(monkeypatch):
    """Attention.forward with autograd on runs the op; its output and every gradient match the torch ops' path
    (ENABLED off) to float32 rounding (no autocast here), with a bool mask and with VAR's grouped BlockCausal."""
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
    for mask in (mask_LL, BlockCausal.from_bounds(bounds, mask_LL, 9)):
        runs = []
        for enabled in (True, False):
            monkeypatch.setattr(fq, "ENABLED", enabled)
            attn.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            assert fq.use_kernel(xi.view(B, L, H, D // H), attn.q_norm, attn.k_norm) == enabled
            out = attn(xi, cos, sin, mask_LS=mask)
            out.square().sum().backward()
            runs.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}))
        (o1, dx1, g1), (o0, dx0, g0) = runs
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-5)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_kernel
def test_the_op_traces_under_torch_compile():
    """The fake implementation and the autograd formula under AOT autograd (backend aot_eager): the compiled
    forward and backward give what the eager op does."""
    qkv, wq, wk, cos, sin = inputs(2, 9, 2, 32, seed=4, dtype=torch.float32)

    def fn(qkv, wq, wk):
        q, k = fq.qk_norm_rope(qkv[:, :, 0], qkv[:, :, 1], wq, wk, EPS, cos, sin)
        return (q * k).sum() + (q * qkv[:, :, 2]).sum()
    assert_compiled_grads_match(fn, (qkv, wq, wk))


def test_no_kernel_without_autograd_identity_norms_or_when_off(monkeypatch):
    """The sampler's no-grad forwards keep the torch ops (their outputs unchanged); so do models without qk-norm
    and ENABLED off. A mismatched table is an error that names the shapes."""
    attn = Attention(32, 2, qk_norm=True)
    q = torch.randn(1, 4, 2, 16, device=KERNEL_DEVICE or "cpu")
    with torch.no_grad():
        assert not fq.use_kernel(q, attn.q_norm, attn.k_norm)
    plain = Attention(32, 2, qk_norm=False)
    assert not fq.use_kernel(q, plain.q_norm, plain.k_norm)
    monkeypatch.setattr(fq, "ENABLED", False)
    assert not fq.use_kernel(q, attn.q_norm, attn.k_norm)
    if fq.triton is not None and KERNEL_DEVICE is not None:
        cos, sin = rope_tables(torch.arange(5), 16)
        with pytest.raises(ValueError, match="RoPE tables"):
            torch.ops.tessera.qk_norm_rope(q, q, attn.q_norm.weight, attn.k_norm.weight, cos, sin, EPS)


@needs_compiler
def test_kernel_compiles_for_hopper():
    """Triton's real front end and sm_90 back end accept the kernel at VAR's head size."""
    sig = {"X0": "*bf16", "X1": "*bf16", "W0": "*fp32", "W1": "*fp32", "COS": "*fp32", "SIN": "*fp32", "O0": "*bf16",
           "O1": "*bf16", "RSTD": "*fp32", "n_rows": "i32", "L": "i32", "H": "i32", "s0_b": "i32", "s0_l": "i32",
           "s0_h": "i32", "s1_b": "i32", "s1_l": "i32", "s1_h": "i32", "eps": "fp32", "F_": "constexpr",
           "ROWS_": "constexpr"}
    k = compile_for_hopper(fq._forward_kernel, sig, dict(F_=32, ROWS_=fq.ROWS), num_warps=fq.WARPS)
    assert k.asm["cubin"]
