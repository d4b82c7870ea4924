import pytest
import torch

from generator.config import GeneratorConfig
from generator.transformer import (Attention, KVCache, Transformer, apply_rope, flops_per_token, init_weights,
                                   rope_tables)


def tiny(**kw):
    return GeneratorConfig(**{"codebook_size": 16, "grid_size": 4, "num_classes": 3, "dim": 32, "depth": 2,
                              "heads": 2, **kw})


def test_rope_is_relative():
    """<R(p) q, R(p') k> depends only on p - p' (per axis)."""
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    pos = torch.tensor([[2.0, 3.0], [5.0, 1.0], [4.0, 6.0], [7.0, 4.0]])    # pairs 0-1 and 2-3 differ by (3, -2)
    cos, sin = rope_tables(pos, 16)
    rq = [apply_rope(q, cos[i], sin[i]) for i in range(4)]
    rk = [apply_rope(k, cos[i], sin[i]) for i in range(4)]
    assert torch.allclose((rq[1] * rk[0]).sum(), (rq[3] * rk[2]).sum(), atol=1e-5)


def test_rope_tables_follow_the_formula_per_axis():
    """Row p of the table: angles [row_p base^(-i/n) for i < n, col_p base^(-i/n) for i < n], n = K/4,
    so each axis rotates its own quarter of the head's frequency pairs."""
    pos = torch.tensor([[2.0, 3.0], [0.5, 7.0]])
    K, base = 16, 100.0
    cos, sin = rope_tables(pos, K, base)
    n = K // 4
    freqs = base ** (-torch.arange(n, dtype=torch.float64) / n)
    angles = torch.cat([pos[:, :1].double() * freqs, pos[:, 1:].double() * freqs], dim=1)
    torch.testing.assert_close(cos, angles.cos().float())
    torch.testing.assert_close(sin, angles.sin().float())
    q, k = torch.randn(16), torch.randn(16)        # different offsets: different scores
    score = lambda a, b: (apply_rope(q, cos[a], sin[a]) * apply_rope(k, cos[b], sin[b])).sum()
    assert not torch.allclose(score(0, 1), score(1, 0), atol=1e-3)


def test_rope_prefix_rows_are_identity():
    cos, sin = rope_tables(torch.zeros(3, 2) + 5, 8, num_prefix=2)
    assert cos.shape == (5, 4)
    assert torch.equal(cos[:2], torch.ones(2, 4)) and torch.equal(sin[:2], torch.zeros(2, 4))


@pytest.mark.parametrize("adaln", [False, True])
def test_cached_decoding_matches_full_causal_forward(adaln):
    config = tiny(adaln=adaln)
    net = Transformer(config).eval()
    init_weights(net, config.depth)
    for p in net.parameters():      # adaLN starts at zero: perturb so the test sees it
        p.data.add_(torch.randn_like(p) * 0.02)
    B, L = 2, 6
    x = torch.randn(B, L, config.dim)
    cond = torch.randn(B, config.dim)
    cos, sin = rope_tables(torch.arange(L).float(), config.head_dim)
    full = net(x, cos, sin, cond, is_causal=True)
    net.setup_caches(B, 8, torch.float32, "cpu")
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    out = [net(x[:, :3], cos[:3], sin[:3], cond, mask_LS=causal[:3], cache_pos=0)]
    for i in range(3, L):
        pos = torch.tensor([i])
        out.append(net(x[:, i:i + 1], cos[i:i + 1], sin[i:i + 1], cond, mask_LS=causal[pos], cache_pos=pos))
    assert torch.allclose(torch.cat(out, 1), full, atol=1e-5)


def test_unmasked_block_fill_attends_to_the_filled_slots_only():
    """Blocks written at int starts with no mask (VAR's scale-by-scale sampling) = the full forward under
    the block-causal mask; the empty slots beyond are never read (NaN there would poison the output)."""
    config = tiny()
    net = Transformer(config).eval()
    init_weights(net, config.depth)
    B, blocks = 2, [(0, 1), (1, 3), (3, 7)]        # block i = positions [a, b)
    L = blocks[-1][1]
    level = torch.tensor([i for i, (a, b) in enumerate(blocks) for _ in range(a, b)])
    x, cos, sin = torch.randn(B, L, config.dim), *rope_tables(torch.arange(L).float(), config.head_dim)
    full = net(x, cos, sin, mask_LS=level[None, :] <= level[:, None])
    net.setup_caches(B, L + 5, torch.float32, "cpu")
    for block in net.blocks:
        block.attn.kv_cache.k.fill_(float("nan"))
        block.attn.kv_cache.v.fill_(float("nan"))
    out = torch.cat([net(x[:, a:b], cos[a:b], sin[a:b], cache_pos=a) for a, b in blocks], 1)
    assert torch.allclose(out, full, atol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    cache = KVCache(1, 2, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="KV cache overflow"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 2)
    cache.update(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8), 2)
    cache.reset()
    assert cache.k.abs().sum() == 0
    assert "k" not in cache.state_dict()     # persistent=False: never in checkpoints


def test_flops_per_token_formula():
    c = tiny()
    D, F, V, L = c.dim, c.mlp_hidden, c.codebook_size, 16
    fwd = 2 * (c.depth * (4 * D * D + 3 * D * F) + D * V) + 4 * c.depth * L * D
    assert flops_per_token(c, L, training=False) == fwd
    assert flops_per_token(c, L) == 3 * fwd


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by heads"):
        tiny(dim=33)
    with pytest.raises(ValueError, match="kind"):
        tiny(kind="gan")
    with pytest.raises(ValueError, match="end at grid_size"):
        tiny(kind="var", scales=(1, 2), codec_dim=4)


def attention_by_formula(attn: Attention, x, cos, sin, mask):
    """softmax(rope(norm(x W_q)) rope(norm(x W_k))^T / sqrt(K) + mask) x W_v, heads joined, W_o: written out
    per head in (B, H, L, K) with an explicit softmax (mask: bool (L, L), True = attend, or None)."""
    B, L, D = x.shape
    H, K = attn.heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)

    def heads(w):
        return (x @ w.T).view(B, L, H, K).transpose(1, 2)

    def rms(t, gain):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * gain

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    q, k = rotate(rms(heads(w_q), attn.q_norm.weight)), rotate(rms(heads(w_k), attn.k_norm.weight))
    scores = q @ k.transpose(-1, -2) / K ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ heads(w_v)
    return out.transpose(1, 2).reshape(B, L, D) @ attn.proj.weight.T


def test_attention_is_the_formula_with_gradients():
    """Attention (qk-norm and RoPE in the projection's (B, L, H, K) order, SDPA on transposed views)
    against the formula, full / causal / block-causal, outputs and gradients of x and every weight."""
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True)
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    B, L = 2, 6
    cos, sin = rope_tables(torch.arange(L).float(), attn.head_dim)
    level = torch.tensor([0, 1, 1, 2, 2, 2])
    cases = [(dict(), None), (dict(is_causal=True), torch.ones(L, L, dtype=torch.bool).tril()),
             (dict(mask_LS=level[None, :] <= level[:, None]), level[None, :] <= level[:, None])]
    for kw, mask in cases:
        results = []
        for fn in (lambda x: attn(x, cos, sin, **kw), lambda x: attention_by_formula(attn, x, cos, sin, mask)):
            attn.zero_grad(set_to_none=True)
            x = torch.randn(B, L, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
            out = fn(x)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append([out.detach(), x.grad] + [p.grad for p in attn.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


