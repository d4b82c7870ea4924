"""What the three families share (generator/base.py): label and batch checks, class dropout, and
sampling / likelihoods in eval mode whatever mode the module is in."""
import pytest
import torch

from generator.base import Generator, build_generator
from generator.config import GeneratorConfig
from tests.generator.test_var import RefCodec, SCALES

V, G = 64, SCALES[-1]


def build(kind: str, **kw) -> Generator:
    extra = dict(scales=SCALES, codec_dim=RefCodec().codebook_dim) if kind == "var" else {}
    config = GeneratorConfig(kind=kind, codebook_size=V, grid_size=G, num_classes=3, dim=32, depth=2, heads=2,
                             **extra, **kw)
    model = build_generator(config)
    if kind == "var":
        model.set_codec(RefCodec())
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():          # the head starts at zero: give the model something to say
        p.data.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def token_batch(model: Generator, B: int) -> torch.Tensor:
    return torch.randint(0, V, (B, model.config.num_tokens), generator=torch.Generator().manual_seed(1))


def sample(model: Generator, seed: int, **kw):
    out = model.sample([0, 2], num_steps=4, generator=torch.Generator().manual_seed(seed), **kw)
    return torch.cat([x.flatten(1) for x in out], 1) if isinstance(out, list) else out


FAMILIES = ["masked", "ar", "var"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_sampling_and_likelihood_run_in_eval_mode_and_restore_the_mode(kind):
    """With dropout on and the module left in training mode, the same seed still gives the same ids and
    the same bits (dropout and class dropout off), and the module is back in training mode after."""
    model = build(kind, dropout=0.5, class_dropout=0.5).train()
    first = sample(model, seed=3)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(sample(model, seed=3), first)
    ids, labels = token_batch(model, 2), torch.tensor([0, 1])
    kw = {"generator": torch.Generator().manual_seed(4)} if kind == "masked" else {}
    bits = model.nll_bits_per_token(ids, labels, **kw)
    assert model.training
    kw = {"generator": torch.Generator().manual_seed(4)} if kind == "masked" else {}
    assert torch.equal(model.eval().nll_bits_per_token(ids, labels, **kw), bits)
    assert torch.equal(sample(model, seed=3), first)           # eval mode throughout: the same draws


@pytest.mark.parametrize("kind", FAMILIES)
def test_label_and_batch_mismatches_name_the_problem(kind):
    model = build(kind).eval()
    ids = token_batch(model, 2)
    with pytest.raises(ValueError, match="got 1 class labels for a batch of 2"):
        model.loss(ids, torch.tensor([0]))
    with pytest.raises(ValueError, match="got 3 class labels for a batch of 2"):
        model.nll_bits_per_token(ids, [0, 1, 2])
    with pytest.raises(ValueError, match="got 2 class labels for a batch of 3"):
        model.sample([0, 1], batch_size=3)
    with pytest.raises(ValueError, match="1-D"):
        model.sample([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="no classes given"):
        model.sample([])
    with pytest.raises(ValueError, match="must be integers"):
        model.loss(ids.float(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=f"expected {model.config.num_tokens} tokens per image"):
        model.nll_bits_per_token(ids[0], [0])                  # one image without its batch dimension


@pytest.mark.parametrize("kind", FAMILIES)
def test_class_dropout_replaces_labels_by_the_null_class_at_its_rate(kind):
    model = build(kind, class_dropout=0.25).train()
    labels = torch.randint(0, 3, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = model.drop_classes(labels, torch.Generator().manual_seed(1))
    changed = dropped != labels
    assert (dropped[changed] == model.config.null_class).all()
    assert abs(changed.float().mean().item() - 0.25) < 0.01    # binomial sd 0.003
    assert torch.equal(model.eval().drop_classes(labels), labels)
    assert torch.equal(build(kind, class_dropout=0.0).train().drop_classes(labels), labels)
