"""Full attention with the leading rows split off (generator/prefix_split.py): the same output and gradients as one
SDPA call, on the CPU's flash kernel (the CUDA kernels' calls differ only in which aten op runs)."""
import pytest
import torch
import torch.nn.functional as F

from generator import prefix_split as ps
from generator.transformer import Attention, rope_tables


def qkv(B, H, L, K, dtype, seed=0):
    """q, k, v as (B, H, L, K) transposed views of (B, L, H, K) tensors, as Attention hands them to SDPA."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, L, H, K, generator=g) * s).to(dtype).transpose(1, 2) for s in (1.5, 1.5, 1.0)]


@pytest.mark.parametrize("L, P", [(20, 1), (21, 4), (9, 8)])
def test_forward_and_gradients_equal_one_sdpa_call(L, P):
    """out and dq, dk, dv (float64): the N rows with the P keys merged through the log-sum-exp, and the backward's
    trick (SDPA's backward fed a dO and the merged output), against autograd through one SDPA call."""
    B, H, K = 2, 3, 8
    leaves = [t.detach().clone().requires_grad_() for t in qkv(B, H, L, K, torch.float64)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grad = torch.randn(B, H, L, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = ps.attend(*leaves, prefix=P)
    ref = F.scaled_dot_product_attention(*ref_leaves)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.backward(grad)
    ref.backward(grad)
    for name, a, b in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_bfloat16_within_rounding():
    """In bf16 (the training dtype) the split agrees with one SDPA call to bf16 rounding, values and gradients."""
    B, H, L, K = 2, 2, 137, 16
    assert ps.prefix_rows(L) == 9
    assert_bf16_matches_one_sdpa_call(qkv(B, H, L, K, torch.bfloat16, seed=2),
                                      torch.randn(B, H, L, K, generator=torch.Generator().manual_seed(3)))


def assert_bf16_matches_one_sdpa_call(q_k_v, grad):
    """``ps.attend`` on bf16 q, k, v against one float32 SDPA call: values and dq, dk, dv to bf16 rounding."""
    leaves = [t.detach().clone().requires_grad_() for t in q_k_v]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    out = ps.attend(*leaves)
    ref = F.scaled_dot_product_attention(*ref_leaves)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.backward(grad.bfloat16())
    ref.backward(grad)
    for name, a, b in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=3e-2, atol=3e-2, msg=lambda m: f"d{name}: {m}")


def test_which_sequences_split(monkeypatch):
    """Off unless enabled; on, only with autograd, past one tile, with 1 to MAX_PREFIX leading rows."""
    assert [ps.prefix_rows(L) for L in (257, 256, 130, 100, 280)] == [1, 0, 2, 0, 24]
    q = torch.zeros(1, 2, 257, 8)
    assert not ps.use_split(q)
    monkeypatch.setattr(ps, "ENABLED", True)
    assert ps.use_split(q)
    assert not ps.use_split(torch.zeros(1, 2, 256, 8)) and not ps.use_split(torch.zeros(1, 2, 280, 8))
    with torch.no_grad():
        assert not ps.use_split(q)


def test_attention_module_takes_it_when_enabled(monkeypatch):
    """Attention's full-attention training forward (the masked generator's: no mask, 1 + 128 rows) with the split
    gives the same output and parameter gradients as without it."""
    torch.manual_seed(0)
    B, L, D, H = 2, 129, 32, 2
    attn = Attention(D, H, qk_norm=True).double()
    cos, sin = rope_tables(torch.arange(L), D // H)
    x = torch.randn(B, L, D, dtype=torch.float64)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(ps, "ENABLED", enabled)
        calls = []
        monkeypatch.setattr(ps.RowsWithPrefixKeys, "apply", _counting(ps.RowsWithPrefixKeys.apply, calls))
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = attn(xi, cos.double(), sin.double())
        out.square().sum().backward()
        assert len(calls) == enabled
        runs.append((out.detach(), xi.grad, [p.grad.clone() for p in attn.parameters()]))
    (o1, d1, g1), (o0, d0, g0) = runs
    torch.testing.assert_close(o1, o0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d1, d0, rtol=1e-8, atol=1e-9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def _counting(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)
    return wrapped


def test_traces_under_torch_compile():
    """The autograd.Function and its aten calls under AOT autograd (backend aot_eager): compiled forward and backward
    give what the eager path does."""
    q, k, v = qkv(1, 2, 12, 8, torch.float32, seed=5)

    def fn(q, k, v):
        return ps.attend(q, k, v, prefix=3).square().sum()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    grads = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        f(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_gpu_backends_agree_with_one_sdpa_call(backend, monkeypatch):
    """On CUDA (bf16, masked-L's 257 rows, head size 64) through cuDNN's or flash's aten ops: the values and
    gradients of one SDPA call, to bf16 rounding."""
    monkeypatch.setattr(ps, "BACKEND", backend)
    B, H, L, K = 2, 4, 257, 64
    assert_bf16_matches_one_sdpa_call([t.cuda() for t in qkv(B, H, L, K, torch.bfloat16, seed=6)],
                                      torch.randn(B, H, L, K, device="cuda",
                                                  generator=torch.Generator("cuda").manual_seed(7)))
