"""VAR's block-causal mask as a FlexAttention BlockMask (compiled training on CUDA): the same mask and
the same attention as the bool-mask SDPA path, and never combined with a KV cache."""
import warnings

import pytest
import torch

from generator.transformer import Attention, BlockMask, KVCache, rope_tables
from generator.var import split_scales
from tests.generator.test_var import SCALES, RefCodec, tiny_model

pytestmark = pytest.mark.skipif(BlockMask is None, reason="FlexAttention needs torch >= 2.5")


def test_block_mask_is_the_block_causal_mask():
    model = tiny_model()
    L = model.config.num_tokens
    block_mask = model._block_mask(L, torch.device("cpu"))
    assert model._block_mask(L, torch.device("cpu")) is block_mask          # built once per (length, device)
    dense = block_mask.mask_mod(0, 0, torch.arange(L)[:, None], torch.arange(L)[None, :])
    assert torch.equal(dense, model.mask_LL)
    assert "_block_masks" not in str(model.state_dict().keys())             # never saved


def test_flex_attention_matches_sdpa_with_the_bool_mask():
    model = tiny_model()
    L, D, H = model.config.num_tokens, 32, 4
    attn = Attention(D, H, qk_norm=True)
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(torch.randn(L, 2), D // H, 100.0)
    with warnings.catch_warnings(), torch.no_grad():   # FlexAttention has no CPU backward
        warnings.simplefilter("ignore")                 # eager flex_attention warns that it is unfused
        out = attn(x, cos, sin, mask_LS=model._block_mask(L, torch.device("cpu")))
        torch.testing.assert_close(out, attn(x, cos, sin, mask_LS=model.mask_LL), atol=1e-5, rtol=1e-5)


def test_block_mask_with_a_kv_cache_is_a_clear_error():
    model = tiny_model()
    L = model.config.num_tokens
    attn = Attention(32, 4, qk_norm=False)
    attn.kv_cache = KVCache(1, 4, L, 8, torch.float32)
    cos, sin = rope_tables(torch.randn(L, 2), 8, 100.0)
    with pytest.raises(ValueError, match="BlockMask"):
        attn(torch.randn(1, L, 32), cos, sin, mask_LS=model._block_mask(L, torch.device("cpu")), cache_pos=0)


def test_eager_training_keeps_the_bool_mask(monkeypatch):
    """Outside torch.compile (and off CUDA) the loss never builds a BlockMask."""
    model = tiny_model().train()
    model.set_codec(RefCodec())
    ids = torch.randint(0, model.config.codebook_size, (2, model.config.num_tokens))
    model.loss(ids, torch.tensor([0, 1])).loss.backward()
    assert model._block_masks == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused flex_attention kernel needs CUDA")
def test_compiled_cuda_loss_takes_the_block_mask_and_matches_eager():
    model = tiny_model(class_dropout=0.0).cuda().train()
    ids = torch.randint(0, model.config.codebook_size, (4, model.config.num_tokens),
                        generator=torch.Generator().manual_seed(0))
    inputs = RefCodec().teacher_forcing_input(split_scales(ids, SCALES))
    ids, inputs, labels = ids.cuda(), inputs.cuda(), torch.tensor([0, 1, 2, 0], device="cuda")
    eager = model.loss(ids, labels, inputs).loss
    assert model._block_masks == {}
    compiled = torch.compile(model.loss)(ids, labels, inputs).loss
    assert list(model._block_masks) == [(model.config.num_tokens, "cuda:0")]
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    compiled.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
