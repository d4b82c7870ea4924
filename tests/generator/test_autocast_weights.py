"""``Generator.autocast_weights``: Linear weights stored in the autocast dtype give the masked and VAR
samplers the same ids under autocast (the AR case is in test_autoregressive.py)."""
import torch

from tests.generator.test_masked import randomised, tiny
from tests.generator.test_var import RefCodec, tiny_model


def _same_ids_before_and_after(model, sample) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = sample(model)
        model.autocast_weights(torch.bfloat16)
        after = sample(model)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert model.class_emb.weight.dtype == torch.float32
    for a, b in zip(before if isinstance(before, list) else [before], after if isinstance(after, list) else [after]):
        assert torch.equal(a, b)


def test_masked_sampling_keeps_its_ids():
    _same_ids_before_and_after(randomised(tiny()), lambda m: m.sample(
        [0, 1, 2], num_steps=4, cfg_scale=2.0, top_k=5, generator=torch.Generator().manual_seed(0)))


def test_var_sampling_keeps_its_ids():
    codec = RefCodec()
    _same_ids_before_and_after(tiny_model(), lambda m: m.sample(
        [0, 1, 2], codec=codec, cfg_scale=1.5, top_k=5, generator=torch.Generator().manual_seed(0)))
