"""VAR's block-causal attention as one SDPA call per group of scales (transformer.BlockCausal): the groups,
the same attention and gradients as SDPA with the whole bool mask, the loss of the model, and never with
a KV cache."""
import pytest
import torch
import torch.nn.functional as F

from generator.transformer import Attention, BlockCausal, KVCache, rope_tables
from generator.var import ALONE_TOKENS
from tests.generator.test_var import RefCodec, tiny_model


def block_causal_mask(sizes):
    level = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return level[None, :] <= level[:, None]


def bounds_of(sizes):
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def test_groups_of_var_d16():
    """At 64: scales under 64 tokens (1..6 x 6: 91 rows) merge into the masked first group, 8x8 and up alone; at
    169 (the default): 255 rows masked, then 13x13 and 16x16."""
    sizes = [s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    mask = block_causal_mask(sizes)
    groups = BlockCausal.from_bounds(bounds_of(sizes), mask, 64)
    assert groups.ends == (91, 155, 255, 424, 680)
    assert torch.equal(groups.first_mask, mask[:91, :91])
    pairs = 91 * 91 + sum((e - s) * e for s, e in zip(groups.ends, groups.ends[1:]))
    assert pairs == 289_437 and int(mask.sum()) == 286_434          # the docstring's numbers
    assert ALONE_TOKENS == 169
    groups = BlockCausal.from_bounds(bounds_of(sizes), mask, ALONE_TOKENS)
    assert groups.ends == (255, 424, 680) and torch.equal(groups.first_mask, mask[:255, :255])
    # a first block already large enough is a group of its own, with no mask
    assert BlockCausal.from_bounds([0, 64, 128], mask, 64) == (None, (64, 128))


@pytest.mark.parametrize("sizes, alone", [((1, 4, 16, 64), 64), ((1, 4, 16, 64), 4), ((1, 4, 16, 64), 1000),
                                          ((9, 3, 5), 1)])
def test_attend_equals_sdpa_with_the_whole_mask(sizes, alone):
    """Outputs and the gradients of q, k and v, in the (B, L, H, K) -> (B, H, L, K) view Attention passes."""
    g = torch.Generator().manual_seed(0)
    L = sum(sizes)
    mask = block_causal_mask(sizes)
    qkv = torch.randn(2, L, 3, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (expected_grad,) = torch.autograd.grad(expected, qkv, grad)
    out = BlockCausal.from_bounds(bounds_of(sizes), mask, alone).attend(q, k, v)
    (out_grad,) = torch.autograd.grad(out, qkv, grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_grad, expected_grad)
    assert out.transpose(1, 2).is_contiguous()                      # the projection's reshape needs no copy


def test_model_logits_equal_the_bool_mask_forward():
    """teacher_forced_logits (grouped: 21 masked rows, then the 8x8 scale alone) against the backbone run
    with the whole block-causal bool mask."""
    model = tiny_model()
    L, labels = model.config.num_tokens, torch.tensor([0, 2])
    inputs = torch.randn(2, L - 1, model.config.codec_dim, generator=torch.Generator().manual_seed(1))
    logits = model.teacher_forced_logits(labels, inputs)
    cond = model.class_emb(labels)
    x = torch.cat([cond[:, None], model.word_embed(inputs)], dim=1) + model.lvl_embed(model.level_L)
    h = model.backbone(x, model.rope_cos, model.rope_sin, cond, mask_LS=model.mask_LL)
    torch.testing.assert_close(logits, model.head(h), atol=1e-5, rtol=1e-5)


def test_a_training_step_backpropagates_through_every_group():
    model = tiny_model().train()
    model.set_codec(RefCodec())
    ids = torch.randint(0, model.config.codebook_size, (2, model.config.num_tokens))
    model.loss(ids, torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_block_causal_with_a_kv_cache_is_a_clear_error():
    model = tiny_model()
    L = model.config.num_tokens
    attn = Attention(32, 4, qk_norm=False)
    attn.kv_cache = KVCache(1, 4, L, 8, torch.float32)
    cos, sin = rope_tables(torch.randn(L, 2), 8, 100.0)
    mask = BlockCausal.from_bounds(model.bounds, model.mask_LL, ALONE_TOKENS)
    with pytest.raises(ValueError, match="BlockCausal"):
        attn(torch.randn(1, L, 32), cos, sin, mask_LS=mask, cache_pos=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash / cuDNN kernels need CUDA")
def test_compiled_cuda_loss_matches_eager():
    model = tiny_model(class_dropout=0.0).cuda().train()
    ids = torch.randint(0, model.config.codebook_size, (4, model.config.num_tokens),
                        generator=torch.Generator().manual_seed(0))
    inputs = model.codec_inputs(ids, RefCodec()).cuda()
    ids, labels = ids.cuda(), torch.tensor([0, 1, 2, 0], device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        eager = model.loss(ids, labels, inputs).loss
        compiled = torch.compile(model.loss)(ids, labels, inputs).loss
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    compiled.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
