"""Full attention with the prefix's keys merged in by the log-sum-exp (transformer.PrefixSplit, NOTES A27): the
same outputs as SDPA over all L keys (one or two prefix tokens, scores large enough to overflow exp), the
masked generator's sampled ids unchanged, a fullgraph trace of its sampling forward, and clear errors."""
import pytest
import torch
import torch.nn.functional as F

import generator.masked
from generator.masked import dynamic_dim
from generator.transformer import Attention, KVCache, PrefixSplit, attention_with_lse, rope_tables
from tests.generator.test_masked import G, V, gen, randomised, tiny


def qkv_views(B, L, H, K, dtype=torch.float64, scale=1.0, seed=0):
    """q, k, v as (B, H, L, K) transposed views of one (B, L, 3, H, K) tensor: transformer.Attention's layout."""
    qkv = torch.randn(B, L, 3, H, K, dtype=dtype, generator=gen(seed)) * scale
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("scale", [1.0, 30.0])       # 30: scores of several thousand, e^s overflows even float64
def test_prefix_split_is_full_attention(prefix, scale):
    q, k, v = qkv_views(3, 11, 2, 8, scale=scale)
    k[:, :, :prefix] *= torch.tensor([4.0, 0.25, 1.0])[:, None, None, None]   # prefix keys dominant, faint, plain
    expected = F.scaled_dot_product_attention(q, k, v)
    out = PrefixSplit(prefix).attend(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * scale)
    assert out.transpose(1, 2).is_contiguous()           # Attention's reshape to (B, L, D) needs no copy
    q32, k32, v32 = (t.float() for t in (q, k, v))                # float32 scores of thousands: ~1e-4 off
    torch.testing.assert_close(PrefixSplit(prefix).attend(q32, k32, v32), expected.float(), rtol=0, atol=1e-4 * scale)


def test_math_kernel_returns_the_log_sum_exp():
    q, k, v = qkv_views(2, 7, 3, 8)
    out, lse = attention_with_lse(q, k, v, 0.3, "math")
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) * 0.3).logsumexp(-1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    with pytest.raises(ValueError, match="kernel 'triton' is not one of"):
        attention_with_lse(q, k, v, 0.3, "triton")


def test_attention_module_gives_the_full_attention_outputs_and_clear_errors():
    attn = Attention(32, 4, qk_norm=True)
    x = torch.randn(2, 9, 32)
    cos, sin = rope_tables(torch.randn(8, 2), 8, num_prefix=1)
    full = attn(x, cos, sin)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, mask_LS=PrefixSplit(1)), full, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="0 < prefix < 9"):
            attn(x, cos, sin, mask_LS=PrefixSplit(9))
    with pytest.raises(ValueError, match="without gradients"):
        attn(x, cos, sin, mask_LS=PrefixSplit(1))
    attn.kv_cache = KVCache(2, 4, 9, 8, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="PrefixSplit mask is for uncached forwards"):
        attn(x, cos, sin, mask_LS=PrefixSplit(1), cache_pos=0)


@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=2.0, top_k=5), dict(cfg_scale=2.0, sampler="ancestral")])
def test_masked_sampling_gives_the_full_attention_ids(kw, monkeypatch):
    """Sampling (no gradients) takes the split path and draws the ids of plain full attention, same seed."""
    model = randomised(tiny(adaln=True))
    ids_BL = torch.where(torch.rand(3, G * G) < 0.5, torch.randint(0, V, (3, G * G)), V)
    logits = model(ids_BL, torch.tensor([0, 1, 2]))                # gradients on: plain SDPA over all tokens
    calls = []
    attend = PrefixSplit.attend
    monkeypatch.setattr(PrefixSplit, "attend", lambda *a: calls.append(1) or attend(*a))
    with torch.no_grad():
        torch.testing.assert_close(model(ids_BL, torch.tensor([0, 1, 2])), logits, rtol=1e-5, atol=1e-5)
    split = model.sample([0, 1, 2], num_steps=6, generator=gen(3), **kw)
    assert len(calls) == model.config.depth * 7                    # every layer of the forward above and 6 steps
    monkeypatch.setattr(generator.masked, "PrefixSplit", lambda prefix: None)   # mask None: plain full attention
    assert torch.equal(model.sample([0, 1, 2], num_steps=6, generator=gen(3), **kw), split)


def test_masked_sampling_forward_traces_the_split_without_graph_breaks():
    """fullgraph=True raises at any graph break; the graph holds the merge's logsumexp (the split path was
    traced), with the head's positions dynamic as in ``sample(compile=True)``."""
    torch._dynamo.reset()
    model = randomised(tiny())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    ids_BL = torch.where(torch.rand(2, G * G) < 0.5, torch.randint(0, V, (2, G * G)), V)
    classes_B = torch.tensor([0, 2])
    with torch.no_grad():
        for count in (9, 5):
            pos_BM = dynamic_dim(torch.randperm(G * G)[:count].sort().values.expand(2, -1).contiguous(), True)
            logits = forward(ids_BL, classes_B, pos_BM)
            assert logits.shape == (2, count, V)
            torch.testing.assert_close(logits, model(ids_BL, classes_B, pos_BM))
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert any("logsumexp" in str(node.target) for node in graphs[0].graph.nodes)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_gpu_kernels_log_sum_exp(kernel):
    """aten's cuDNN / flash kernels called directly (private signatures): bf16 outputs of full attention."""
    q, k, v = (t.cuda() for t in qkv_views(4, 257, 12, 64, dtype=torch.bfloat16))
    out, lse = attention_with_lse(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], 0.125, kernel)
    assert lse.shape == (4, 12, 256) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, (q[:, :, 1:].float() @ k[:, :, 1:].float().transpose(-1, -2) / 8).logsumexp(-1),
                               rtol=1e-3, atol=1e-3)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(PrefixSplit(1, kernel).attend(q, k, v).float(), expected, rtol=2e-2, atol=2e-2)
