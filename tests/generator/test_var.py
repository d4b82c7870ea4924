import copy
import math

import pytest
import torch
import torch.nn.functional as F

from generator.base import Generator
from generator.config import GeneratorConfig
from generator.sampling import sample_logits
from generator.var import ScaleCodec, VARGenerator, join_scales, scale_positions, split_scales

SCALES = (1, 2, 4, 8)
V, C = 64, 8


class RefCodec:
    """A reference ScaleCodec: random code embeddings, identity Phi, bilinear up, area down.

    ``next_scale_input`` accumulates f_hat step by step (inference); ``teacher_forcing_input``
    is written differently on purpose (all scales at once, cumulative sum), so the parity test
    compares two computations."""

    def __init__(self, scales=SCALES, codebook_size=V, dim=C, seed=1):
        self.scales, self.codebook_dim = tuple(scales), dim
        self.embed_VC = torch.randn(codebook_size, dim, generator=torch.Generator().manual_seed(seed))

    def _up(self, ids_Bss):
        h_BChw = self.embed_VC[ids_Bss].permute(0, 3, 1, 2)
        G = self.scales[-1]
        return h_BChw if h_BChw.shape[-1] == G else F.interpolate(h_BChw, size=(G, G), mode="bilinear")

    def next_scale_input(self, f_hat_BChw, ids_k_Bss, k):
        h_BChw = self._up(ids_k_Bss)
        f_hat_BChw = h_BChw if f_hat_BChw is None else f_hat_BChw + h_BChw
        if k == len(self.scales) - 1:
            return f_hat_BChw, None
        s = self.scales[k + 1]
        return f_hat_BChw, F.interpolate(f_hat_BChw, size=(s, s), mode="area").flatten(2).transpose(1, 2)

    def teacher_forcing_input(self, ids_list, check_range=True):
        f_hats_KBChw = torch.stack([self._up(ids) for ids in ids_list]).cumsum(0)
        return torch.cat([F.interpolate(f, size=(s, s), mode="area").flatten(2).transpose(1, 2)
                          for f, s in zip(f_hats_KBChw[:-1], self.scales[1:])], dim=1)


def tiny_config(**kw):
    return GeneratorConfig(**{"kind": "var", "codebook_size": V, "grid_size": SCALES[-1], "scales": SCALES,
                              "codec_dim": C, "num_classes": 3, "dim": 32, "depth": 2, "heads": 2,
                              "adaln": True, **kw})


def tiny_model(perturb=True, **kw):
    model = VARGenerator(tiny_config(**kw)).eval()
    if perturb:     # adaLN and head start at zero: perturb so the tests see every path
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def random_ids(B, scales=SCALES, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, s, s), generator=g) for s in scales]


def reference_sample(model, codec, classes, *, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                     generator=None, known_ids=None, known_mask=None):
    """Uncached sampler: a full forward over the whole prefix at every scale."""
    labels = torch.as_tensor(classes)
    B, K = labels.shape[0], len(codec.scales)
    if cfg_scale != 1.0:
        labels = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    inputs, f_hat, out, a = [torch.zeros(B, 0, C)], None, [], 0
    for k, s in enumerate(codec.scales):
        feats = torch.cat(inputs, 1)
        feats = feats if cfg_scale == 1.0 else torch.cat([feats, feats])
        logits = model.teacher_forced_logits(labels, feats)[:, a:a + s * s].float()
        a += s * s
        if cfg_scale != 1.0:
            w = 1 + (cfg_scale - 1) * k / (K - 1)
            logits = logits[B:] + w * (logits[:B] - logits[B:])
        ids = sample_logits(logits, temperature, top_k, top_p, generator)[0].view(B, s, s)
        if known_ids is not None:
            ids = torch.where(known_mask[k], known_ids[k], ids)
        out.append(ids)
        f_hat, nxt = codec.next_scale_input(f_hat, ids, k)
        if nxt is not None:
            inputs.append(nxt)
    return out


def test_block_causal_mask_and_positions():
    model = tiny_model(perturb=False)
    level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(SCALES)])
    for q in range(len(level)):
        assert torch.equal(model.mask_LL[q], level <= level[q])     # own + coarser scales, never finer
    assert "mask_LL" not in model.state_dict()
    pos = scale_positions(SCALES)
    assert torch.allclose(pos[0], torch.tensor([3.5, 3.5]))         # the 1x1 token sits at the centre
    assert torch.equal(pos[-64:], torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0)))
    assert torch.allclose(pos[1:5].mean(0), pos[0])                  # each scale is centred on the grid


def test_split_join_roundtrip():
    ids_list = random_ids(2)
    ids_BL = join_scales(ids_list)
    assert ids_BL.shape == (2, 85)
    assert all(torch.equal(a, b) for a, b in zip(split_scales(ids_BL, SCALES), ids_list))
    with pytest.raises(ValueError, match="expected 85 tokens"):
        split_scales(ids_BL[:, :-1], SCALES)


def test_teacher_forcing_input_equals_inference_input():
    codec, ids_list = RefCodec(), random_ids(3)
    assert isinstance(codec, ScaleCodec)
    f_hat, nexts = None, []
    for k, ids in enumerate(ids_list):
        f_hat, nxt = codec.next_scale_input(f_hat, ids, k)
        if nxt is not None:
            nexts.append(nxt)
    assert nxt is None and len(nexts) == len(SCALES) - 1
    tf = codec.teacher_forcing_input(ids_list)
    assert tf.shape == (3, 84, C)
    assert torch.allclose(torch.cat(nexts, 1), tf, atol=1e-5)


def test_logits_of_a_scale_ignore_finer_scales():
    model, codec = tiny_model(), RefCodec()
    ids_list, labels = random_ids(2), torch.tensor([0, 2])
    inputs = codec.teacher_forcing_input(ids_list)
    logits = model.teacher_forced_logits(labels, inputs)
    b, first = model.bounds, model.first_l
    for k in range(len(SCALES) - 1):
        # new inputs for every scale finer than k: logits of scales <= k stay, scale k+1 moves
        noisy = inputs.clone()
        noisy[:, b[k + 1] - first:] = torch.randn_like(noisy[:, b[k + 1] - first:])
        other = model.teacher_forced_logits(labels, noisy)
        assert torch.allclose(other[:, :b[k + 1]], logits[:, :b[k + 1]], atol=1e-5)
        assert not torch.allclose(other[:, b[k + 1]:b[k + 2]], logits[:, b[k + 1]:b[k + 2]], atol=1e-3)
        # new ids finer than k change the inputs (hence logits) of scales k+2.. only
        changed = ids_list[:k + 1] + random_ids(2, SCALES[k + 1:], seed=10 + k)
        other = model.teacher_forced_logits(labels, codec.teacher_forcing_input(changed))
        assert torch.allclose(other[:, :b[k + 2]], logits[:, :b[k + 2]], atol=1e-5)


@pytest.mark.parametrize("cfg_scale,top_k,top_p", [(1.0, 0, 1.0), (3.0, 0, 1.0), (2.0, 10, 0.9)])
def test_cached_sampling_matches_uncached_reference(cfg_scale, top_k, top_p):
    model, codec = tiny_model(), RefCodec()
    kw = dict(cfg_scale=cfg_scale, top_k=top_k, top_p=top_p)
    cached = model.sample([0, 1, 2], codec=codec, generator=torch.Generator().manual_seed(5), **kw)
    ref = reference_sample(model, codec, [0, 1, 2], generator=torch.Generator().manual_seed(5), **kw)
    assert [tuple(x.shape) for x in cached] == [(3, s, s) for s in SCALES]
    assert all(x.dtype == torch.long for x in cached)
    assert all(torch.equal(a, b) for a, b in zip(cached, ref))
    assert all(m.attn.kv_cache is None for m in model.backbone.blocks)     # caches removed


def test_sampling_is_deterministic_under_a_seed():
    model, codec = tiny_model(), RefCodec()
    draw = lambda seed: join_scales(model.sample([1, 1], codec=codec, cfg_scale=2.0,
                                                 generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_cfg_scale_one_is_the_conditional_prediction_in_one_pass():
    model, codec = tiny_model(), RefCodec()
    batches = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: batches.append(out.shape[0]))
    plain = model.sample([0, 2], codec=codec, cfg_scale=1.0, generator=torch.Generator().manual_seed(4))
    hook.remove()
    assert batches == [2] * len(SCALES)                                      # no unconditional pass
    ref = reference_sample(model, codec, [0, 2], generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(plain, ref))
    # the linear ramp starts at 1: the first scale of a guided run is the conditional draw too
    guided = model.sample([0, 2], codec=codec, cfg_scale=4.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(guided[0], plain[0])


def test_inpainting_forces_known_tokens_at_every_scale():
    model, codec = tiny_model(), RefCodec()
    known = random_ids(2, seed=11)
    g = torch.Generator().manual_seed(12)
    mask = [torch.rand(2, s, s, generator=g) < 0.5 for s in SCALES]
    out = model.sample([0, 1], codec=codec, cfg_scale=2.0, known_ids=known, known_mask=mask,
                       generator=torch.Generator().manual_seed(6))
    for o, ids, m in zip(out, known, mask):
        assert torch.equal(o[m], ids[m])
    ref = reference_sample(model, codec, [0, 1], cfg_scale=2.0, known_ids=known, known_mask=mask,
                           generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))   # forced tokens also feed the next scale
    placeholders = [torch.where(m, ids, -1) for ids, m in zip(known, mask)]   # unknown cells hold any value
    again = model.sample([0, 1], codec=codec, cfg_scale=2.0, known_ids=placeholders, known_mask=mask,
                         generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(again, out))
    everything = [torch.ones_like(m) for m in mask]
    full = model.sample(None, codec=codec, known_ids=join_scales(known), known_mask=join_scales(everything))
    assert all(torch.equal(a, b) for a, b in zip(full, known))


def test_tiny_model_overfits_two_sequences():
    model = VARGenerator(tiny_config(class_dropout=0.0)).train()
    codec = RefCodec()
    model.set_codec(codec)
    ids_BL, labels = join_scales(random_ids(2, seed=13)), torch.tensor([0, 1])
    inputs = codec.teacher_forcing_input(split_scales(ids_BL, SCALES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, foreach=True)
    first = model.loss(ids_BL, labels, inputs).loss.item()
    assert abs(first - math.log(V)) < 1e-4                    # zero-init head: uniform predictions
    for _ in range(100):
        out = model.loss(ids_BL, labels, inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    model.eval()
    out = model.loss(ids_BL, labels)                           # inputs from the set codec
    assert out.loss.item() < 0.05 and out.metrics["accuracy"].item() == 1.0
    assert set(out.metrics) == {"loss", "accuracy", "loss_1x1", "loss_2x2", "loss_4x4", "loss_8x8"}
    bits = model.nll_bits_per_token(ids_BL, labels)
    assert torch.allclose(bits.mean(), out.loss / math.log(2), atol=1e-5)
    greedy = model.sample(labels, temperature=0.0)              # the set codec is used
    assert torch.equal(join_scales(greedy), ids_BL)


def test_save_load_gives_identical_logits_without_the_codec(tmp_path):
    model, codec = tiny_model(), RefCodec()
    model.set_codec(codec)
    assert model.codec is codec and copy.deepcopy(model).codec is codec    # EMA copies share it
    assert not any("codec" in k for k in model.state_dict())
    model.save(tmp_path)
    loaded = Generator.from_pretrained(tmp_path)
    assert isinstance(loaded, VARGenerator) and loaded.codec is None
    labels, inputs = torch.tensor([0, 1]), codec.teacher_forcing_input(random_ids(2))
    assert torch.equal(loaded.teacher_forced_logits(labels, inputs), model.teacher_forced_logits(labels, inputs))


def test_user_errors_are_value_errors():
    model, codec = tiny_model(), RefCodec()
    with pytest.raises(ValueError, match="class id 7 is out of range"):
        model.sample([0, 7], codec=codec)
    ids_BL = join_scales(random_ids(1))
    with pytest.raises(ValueError, match="out of range"):
        model.nll_bits_per_token(ids_BL, [5], codec_inputs_BlC=codec.teacher_forcing_input(random_ids(1)))
    with pytest.raises(ValueError, match="set_codec"):
        model.loss(ids_BL, torch.tensor([0]))
    with pytest.raises(ValueError, match="codec=tokenizer"):
        model.sample([0])
    with pytest.raises(ValueError, match="scales"):
        model.sample([0], codec=RefCodec(scales=(1, 2, 8)))
    with pytest.raises(ValueError, match="codebook_dim"):
        model.set_codec(RefCodec(dim=4))
    with pytest.raises(ValueError, match="not a ScaleCodec"):
        model.sample([0], codec=object())
    with pytest.raises(ValueError, match="expected 85 tokens"):
        model.loss(ids_BL[:, :-1], torch.tensor([0]), torch.zeros(1, 84, C))
    with pytest.raises(ValueError, match="shape"):
        model.sample([0], codec=codec, known_ids=random_ids(2), known_mask=[torch.ones(2, s, s, dtype=torch.bool)
                                                                             for s in SCALES])
    with pytest.raises(ValueError, match="cfg schedule"):
        model.sample([0], codec=codec, cfg_scale=2.0, cfg_schedule="cubic")


def test_teacher_forcing_range_check_is_the_only_host_sync_and_training_skips_it(monkeypatch):
    """Public calls check id ranges (a clear error); the VAR loss, whose ids come from a token cache
    this tokenizer made, skips that check, the step's only host sync, and gets the same inputs."""
    import tokenizer.vqgan as vqgan
    from tests.tokenizer.test_multiscale import SCALES as MS_SCALES, tiny_msvq
    model = tiny_msvq()
    ids = [torch.randint(0, 32, (2, s, s)) for s in MS_SCALES]
    bad = [i.clone() for i in ids]
    bad[2][0, 0, 0] = 32
    with pytest.raises(ValueError, match="token id 32 .* out of range"):
        model.teacher_forcing_input(bad)
    checked = model.teacher_forcing_input(ids)
    calls = []
    monkeypatch.setattr(vqgan, "_check_range", lambda *a: calls.append(a))
    assert torch.equal(model.teacher_forcing_input(ids, check_range=False), checked) and not calls
    var = VARGenerator(GeneratorConfig(kind="var", codebook_size=32, grid_size=8, scales=MS_SCALES, codec_dim=4,
                                       num_classes=3, dim=16, depth=1, heads=2))
    var.set_codec(model)
    ids_BL = torch.cat([i.flatten(1) for i in ids], dim=1)
    var.loss(ids_BL, torch.tensor([0, 1]))
    assert not calls                                     # the training loss made no range check
    var.nll_bits_per_token(ids_BL, [0, 1])               # evaluation may check (and sync)
