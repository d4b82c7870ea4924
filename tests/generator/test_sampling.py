"""generator/sampling.py: top-k / top-p support, temperature, CFG combine and ramp, draws, keep_known."""
import pytest
import torch

from generator.sampling import (cfg_combine, cfg_combine_doubled, cfg_scale_at, exponential_noise, fill_exponential_,
                                keep_known, make_generator, sample_logits, top_k_top_p_filter)

# probabilities 5/32, 16/32, 3/32, 8/32: dyadic, so softmax(log p) and its cumulative sums are exact in float32
PROBS = torch.tensor([5.0, 16.0, 3.0, 8.0]) / 32
LOGITS = PROBS.log()


def support(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (4, {0, 1, 2, 3}),
                                         (0, {0, 1, 2, 3}), (9, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_largest(k, expected):
    logits = torch.tensor([1.0, 5.0, -2.0, 4.0])
    out = top_k_top_p_filter(logits, top_k=k)
    assert support(out) == expected
    assert torch.equal(out[list(expected)], logits[list(expected)])    # kept logits untouched


@pytest.mark.parametrize("p, expected", [
    (1.0, {0, 1, 2, 3}),       # off
    (0.75, {1, 3}),            # mass of the two best is exactly 0.75: they suffice
    (0.7500001, {0, 1, 3}),    # just above: the next one is needed
    (0.5, {1}),                # the best alone reaches exactly 0.5
    (0.5000001, {1, 3}),
    (0.96, {0, 1, 2, 3}),
    (1e-6, {1}),               # tiny p keeps the single most likely token
])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert support(top_k_top_p_filter(LOGITS, top_p=p)) == expected


def test_top_p_works_row_wise_and_after_top_k():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])                # row 1: probs 8, 3, 16, 5 (/32)
    out = top_k_top_p_filter(logits, top_p=0.75)
    assert support(out[0]) == {1, 3} and support(out[1]) == {0, 2}
    # top-k first (keeps 16, 8, 5), then the nucleus of the renormalised 16/29, 8/29, 5/29
    assert support(top_k_top_p_filter(LOGITS, top_k=3, top_p=0.8)) == {1, 3}


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 11)
    ids, probs = sample_logits(logits, temperature=0.0, top_k=3, generator=make_generator(0, "cpu"))
    assert torch.equal(ids, logits.argmax(-1))
    assert torch.equal(probs, torch.nn.functional.one_hot(ids, 11).float())


def test_draws_follow_the_filtered_distribution_and_the_generator():
    logits = LOGITS.expand(40000, 4)
    ids, probs = sample_logits(logits, temperature=1.0, top_k=3, generator=make_generator(1, "cpu"))
    assert torch.allclose(probs[0], torch.tensor([5.0, 16.0, 0.0, 8.0]) / 29)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert freq[2] == 0                                            # never outside the support
    assert torch.allclose(freq, probs[0], atol=0.01)
    again, _ = sample_logits(logits, temperature=1.0, top_k=3, generator=make_generator(1, "cpu"))
    other, _ = sample_logits(logits, temperature=1.0, top_k=3, generator=make_generator(2, "cpu"))
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_a_tiny_temperature_is_the_argmax_not_nan():
    """logits / 1e-38 overflow to +-inf; the row max is subtracted first, so the draw stays the argmax."""
    logits = torch.tensor([[1.0, 5.0, -2.0, 4.0], [0.5, -1.0, 3.0, 2.0]])
    ids, probs = sample_logits(logits, temperature=1e-38, generator=make_generator(0, "cpu"))
    assert ids.tolist() == [1, 2] and torch.equal(probs, torch.nn.functional.one_hot(ids, 4).float())


def test_temperature_sharpens_and_flattens():
    _, cold = sample_logits(LOGITS, temperature=0.5)
    _, hot = sample_logits(LOGITS, temperature=2.0)
    assert torch.allclose(cold, PROBS ** 2 / (PROBS ** 2).sum())
    assert torch.allclose(hot, PROBS.sqrt() / PROBS.sqrt().sum())


def test_cfg_combine_formula():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.allclose(cfg_combine(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond))
    assert torch.allclose(cfg_combine(cond, uncond, 1.0), cond, atol=1e-6)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    scale = torch.tensor([[1.0], [2.0], [3.0]])                   # per-row scales broadcast
    assert torch.allclose(cfg_combine(cond, uncond, scale)[2], uncond[2] + 3 * (cond[2] - uncond[2]))
    # the samplers' doubled batch [cond; uncond] -> the guided half
    assert torch.equal(cfg_combine_doubled(torch.cat([cond, uncond]), 2.5), cfg_combine(cond, uncond, 2.5))
    B = cond.shape[0]                                     # one unconditional row shared by the batch: broadcast
    shared = cfg_combine_doubled(torch.cat([cond, uncond[:1]]), 2.5, batch=B)
    assert torch.equal(shared, cfg_combine(cond, uncond[:1].expand_as(cond), 2.5))
    with pytest.raises(ValueError, match="2B = .* or B \\+ 1"):
        cfg_combine_doubled(torch.cat([cond, uncond[:2]]), 2.5, batch=B)


def test_cfg_scale_at():
    assert [cfg_scale_at(4.0, t, "linear") for t in (0.0, 0.25, 0.5, 1.0)] == [1.0, 1.75, 2.5, 4.0]
    assert [cfg_scale_at(4.0, t) for t in (0.0, 1.0)] == [4.0, 4.0]
    assert cfg_scale_at(1.0, 0.3, "linear") == 1.0
    with pytest.raises(ValueError, match="cfg schedule 'cubic'"):
        cfg_scale_at(2.0, 0.5, "cubic")


def test_keep_known():
    ids = torch.tensor([[1, 2], [3, 4]])
    known = torch.tensor([[9, 9], [8, 8]])
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.equal(keep_known(ids, known, mask), torch.tensor([[9, 2], [3, 8]]))
    assert keep_known(ids, None, None) is ids


def test_exponential_noise_is_seeded():
    a = exponential_noise((4, 5), make_generator(3, "cpu"), "cpu")
    b = exponential_noise((4, 5), make_generator(3, "cpu"), "cpu")
    assert torch.equal(a, b) and (a > 0).all()
    assert make_generator(None, "cpu") is None
    gen = make_generator(3, "cpu")
    out = [fill_exponential_(torch.empty(4, 5), gen) for _ in range(2)]     # into buffers: the same stream
    assert torch.equal(out[0], a) and not torch.equal(out[1], a)
