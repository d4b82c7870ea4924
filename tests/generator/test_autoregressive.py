"""generator/autoregressive.py: causality, cached vs uncached parity, sampling, inpainting, overfit, save/load."""
import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

import generator.autoregressive as autoregressive
from generator.autoregressive import ARGenerator, kv_slots
from generator.base import load_generator
from generator.config import GeneratorConfig
from generator.sampling import cfg_combine, cfg_scale_at, exponential_noise, keep_known, make_generator, sample_logits

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "generator"
TRAIN_KEYS = {"batch_size", "grad_accum", "max_steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "betas",
              "grad_clip", "ema_decay", "mixed_precision", "compile", "checkpoint_every", "keep_checkpoints",
              "log_every", "sample_every", "seed", "num_workers", "max_nonfinite", "distributed"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads ran
    ~30x slower (oversubscription); restore the setting for the other test files."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny(perturb=True, **kw) -> ARGenerator:
    config = GeneratorConfig(**{"kind": "ar", "codebook_size": 32, "grid_size": 4, "num_classes": 3, "dim": 32,
                                "depth": 2, "heads": 2, **kw})
    model = ARGenerator(config)
    if perturb:      # the head (and adaLN) start at zero: give the model something to say
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def naive_sample(model, classes, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, seed=0,
                 known_ids=None, known_mask=None):
    """Reference sampler: a full uncached forward for every token, same draws as ARGenerator.sample."""
    N, g = model.config.num_tokens, model.config.grid_size
    gen = make_generator(seed, "cpu")
    ids = torch.zeros(len(classes), N, dtype=torch.long)
    null = torch.full_like(classes, model.config.null_class)
    for i in range(N):
        logits = model.logits(ids, classes)[:, i]
        if cfg_scale != 1.0:
            logits = cfg_combine(logits, model.logits(ids, null)[:, i], cfg_scale)
        ids[:, i], _ = sample_logits(logits, temperature, top_k, top_p, gen)
        if known_mask is not None:
            ids[:, i] = keep_known(ids[:, i], known_ids.reshape(-1, N)[:, i], known_mask.reshape(-1, N)[:, i])
    return ids.reshape(-1, g, g)


def test_loss_starts_at_log_v_and_nll_matches_loss():
    model = tiny(perturb=False)
    ids, labels = torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2])
    out = model.loss(ids, labels)
    assert math.isclose(out.loss.item(), math.log(32), rel_tol=1e-5)          # zero-init head: uniform
    assert set(out.metrics) == {"loss", "accuracy"}
    model = tiny()
    bits = model.nll_bits_per_token(ids.reshape(3, 4, 4), labels)
    assert bits.shape == (3,)
    model.config.class_dropout = 0.0
    assert torch.allclose(bits.mean(), model.loss(ids, labels).loss / math.log(2), atol=1e-5)


def test_input_i_is_rotated_by_the_cell_of_the_token_it_carries():
    """Inputs are [class, t_0 .. t_{N-2}]: row 0 (the class) is the identity rotation and input i >= 1
    carries t_{i-1}, so its angles are those of cell i - 1 = (row, col) in raster order."""
    model = tiny(perturb=False)
    g, K, base = model.config.grid_size, model.config.head_dim, model.config.rope_base
    n = K // 4
    freqs = base ** (-torch.arange(n, dtype=torch.float64) / n)
    N = g * g
    assert model.rope_cos.shape == (N, K // 2)
    assert torch.equal(model.rope_cos[0], torch.ones(K // 2)) and torch.equal(model.rope_sin[0], torch.zeros(K // 2))
    for i in range(1, N):
        row, col = divmod(i - 1, g)
        angles = torch.cat([row * freqs, col * freqs])
        torch.testing.assert_close(model.rope_cos[i], angles.cos().float())
        torch.testing.assert_close(model.rope_sin[i], angles.sin().float())


def test_causal_logits_at_i_ignore_tokens_from_i_on():
    model = tiny()
    ids, classes = torch.randint(0, 32, (2, 16)), torch.tensor([0, 2])
    base = model.logits(ids, classes)
    for k in (0, 5, 15):
        changed = ids.clone()
        changed[:, k:] = (changed[:, k:] + 7) % 32
        out = model.logits(changed, classes)
        assert torch.allclose(out[:, :k + 1], base[:, :k + 1], atol=1e-6)     # position k predicts t_k from t_<k
        if k < 15:
            assert not torch.allclose(out[:, k + 1:], base[:, k + 1:], atol=1e-3)


@pytest.mark.parametrize("adaln", [False, True])
def test_kv_cached_decoding_matches_full_forward(adaln):
    model = tiny(adaln=adaln)
    ids, classes = torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 3])        # 3 = null class
    full = model.logits(ids, classes)
    model.backbone.setup_caches(3, 16, torch.float32, "cpu")
    steps = [model.prefill(classes)]
    for p in range(1, 16):
        steps.append(model.decode_one_token(ids[:, p - 1], torch.tensor([p]), classes))
    model.backbone.remove_caches()
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(cfg_scale=3.0),
                                dict(temperature=0.0, cfg_scale=2.0)])
def test_cached_sampling_matches_naive_sampler(kw):
    model = tiny(adaln=True)
    classes = torch.tensor([0, 1, 2, 1])
    ids = model.sample(classes, generator=make_generator(0, "cpu"), **kw)
    assert ids.shape == (4, 4, 4) and ids.dtype == torch.long
    assert torch.equal(ids, naive_sample(model, classes, seed=0, **kw))


def test_sampling_is_deterministic_under_a_seed():
    model = tiny()
    a = model.sample([0, 1, 2], generator=make_generator(7, "cpu"))
    b = model.sample([0, 1, 2], generator=make_generator(7, "cpu"))
    c = model.sample([0, 1, 2], generator=make_generator(8, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_tokens_and_schedules():
    model = tiny()
    classes = torch.tensor([0, 1])
    plain = model.sample(classes, generator=make_generator(1, "cpu"))
    # guidance on none of the tokens: the doubled batch is kept, scale 1 = the conditional logits
    assert torch.equal(model.sample(classes, cfg_scale=4.0, cfg_tokens=0, generator=make_generator(1, "cpu")), plain)
    full = model.sample(classes, cfg_scale=4.0, generator=make_generator(1, "cpu"))
    head = model.sample(classes, cfg_scale=4.0, cfg_tokens=6, generator=make_generator(1, "cpu"))
    assert not torch.equal(full, plain)
    assert torch.equal(head.flatten(1)[:, :6], full.flatten(1)[:, :6])
    ramp = model.sample(classes, cfg_scale=4.0, cfg_schedule="linear", generator=make_generator(1, "cpu"))
    assert ramp.flatten(1)[:, 0].equal(plain.flatten(1)[:, 0])       # the ramp starts at scale 1
    with pytest.raises(ValueError, match="cfg schedule"):
        model.sample(classes, cfg_scale=2.0, cfg_schedule="cubic")
    with pytest.raises(ValueError, match="cfg_tokens"):
        model.sample(classes, cfg_scale=2.0, cfg_tokens=17)


def test_inpainting_forces_known_tokens_and_conditions_on_them():
    model = tiny()
    classes = torch.tensor([0, 2])
    known = torch.randint(0, 32, (2, 4, 4))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1] = True                        # row 1 known
    mask[1, 3, 2] = True                     # and one token late in the second image
    ids = model.sample(classes, known_ids=known, known_mask=mask, generator=make_generator(3, "cpu"))
    assert torch.equal(ids[mask], known[mask])
    # tokens after the known ones are drawn given them: parity with the full-context reference
    assert torch.equal(ids, naive_sample(model, classes, seed=3, known_ids=known, known_mask=mask))
    # AR is causal: tokens before the first known one are those of an unconstrained draw
    free = model.sample(classes, generator=make_generator(3, "cpu"))
    assert torch.equal(ids[:, 0], free[:, 0])
    other = model.sample(classes, known_ids=(known + 1) % 32, known_mask=mask, generator=make_generator(3, "cpu"))
    assert not torch.equal(other[:, 2:], ids[:, 2:])                  # changing the context changes what follows
    with pytest.raises(ValueError, match="known_ids and known_mask must be"):
        model.sample(classes, known_ids=known[:, :2], known_mask=mask[:, :2])
    with pytest.raises(ValueError, match="both"):
        model.sample(classes, known_ids=known)


def test_overfits_two_sequences_and_greedy_sampling_recovers_them():
    cfg = yaml.safe_load((CONFIGS / "ar-tiny.yaml").read_text())["model"]
    model = ARGenerator(GeneratorConfig(**{**cfg, "class_dropout": 0.0})).train()
    ids = torch.randint(0, cfg["codebook_size"], (2, cfg["grid_size"] ** 2))
    labels = torch.tensor([3, 7])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):             # accuracy reaches 1.0 after ~20 steps
        out = model.loss(ids, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.metrics["accuracy"] == 1.0
    greedy = model.sample(labels, temperature=0.0)
    assert model.training                                             # mode restored, caches gone
    assert all(block.attn.kv_cache is None for block in model.backbone.blocks)
    assert torch.equal(greedy.flatten(1), ids)


def test_user_errors_are_value_errors():
    model = tiny()
    with pytest.raises(ValueError, match="class id 4 is out of range: the model has 3 classes"):
        model.sample([0, 4])
    with pytest.raises(ValueError, match="out of range"):
        model.logits(torch.zeros(1, 16, dtype=torch.long), [-1])
    with pytest.raises(ValueError, match="expected 16 tokens"):
        model.logits(torch.zeros(1, 15, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="token ids must be in"):
        model.nll_bits_per_token(torch.full((1, 16), 32), [0])
    with pytest.raises(ValueError, match="temperature"):
        model.sample([0], temperature=-1.0)
    with pytest.raises(ValueError, match="batch size"):
        model.sample(None)
    assert model.sample(None, batch_size=2, num_steps=99).shape == (2, 4, 4)   # unconditional; num_steps ignored


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    model = tiny()

    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager = model.sample([0, 1], generator=make_generator(5, "cpu"))
    with caplog.at_level(logging.WARNING, logger="generator.autoregressive"):
        ids = model.sample([0, 1], generator=make_generator(5, "cpu"), compile=True)
    assert torch.equal(ids, eager)
    assert "decoding eagerly" in caplog.text


def test_compiled_step_is_cached_per_module_and_not_shared_by_a_copy(monkeypatch):
    compiled = []

    def fake_compile(fn, **kw):
        compiled.append(kw)
        return lambda *args: fn(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = tiny()
    model.sample([0], compile=True)
    model.sample([1], compile=True)
    assert compiled == [dict(fullgraph=True)]        # built once, then reused
    ema = copy.deepcopy(model)                     # e.g. an EMA copy: must not decode with the original's weights
    for p in ema.parameters():
        p.data.mul_(-1.0)
    assert torch.equal(ema.sample([0, 1], compile=True, generator=make_generator(0, "cpu")),
                       ema.sample([0, 1], compile=False, generator=make_generator(0, "cpu")))
    assert len(compiled) == 2


@pytest.mark.parametrize("chunk", [5, 32])
def test_compiled_decoding_keeps_its_buffers_per_setup(chunk, monkeypatch):
    """Tokens decoded in chunks (noise of a chunk drawn before its tokens) give the old loop's ids; the
    compiled decoder keeps one setup's buffers (and KV caches) across calls, replaced by a new setup,
    and the module itself is left without caches."""
    monkeypatch.setattr(autoregressive, "GRAPH_TOKENS", chunk)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **opts: real_compile(fn, backend="eager", fullgraph=True))
    kw = dict(cfg_scale=2.0, top_k=6)
    model, classes = tiny(adaln=True), torch.tensor([0, 1, 2])
    ref = old_loop_sample(model, classes, seed=6, **kw)
    torch._dynamo.reset()
    try:
        assert torch.equal(model.sample(classes, generator=make_generator(6, "cpu"), compile=False, **kw), ref)
        assert model._compiled is None                                 # eager decoding keeps nothing
        first = model.sample(classes, generator=make_generator(6, "cpu"), compile=True, **kw)
        buf = model._compiled.buffers
        assert torch.equal(first, ref) and buf.calls == 1 and len(buf.noise) == chunk
        assert all(block.attn.kv_cache is None for block in model.backbone.blocks)
        again = model.sample(classes, generator=make_generator(6, "cpu"), compile=True, **kw)
        assert torch.equal(again, ref) and model._compiled.buffers is buf and buf.calls == 2
        other = model.sample(classes[:2], generator=make_generator(6, "cpu"), compile=True, **kw)
        assert model._compiled.buffers is not buf and model._compiled.buffers.calls == 1
        assert torch.equal(other, old_loop_sample(model, classes[:2], seed=6, **kw))
        buf = model._compiled.buffers
        model.head.weight.data = model.head.weight.data.clone()     # new storage (as model.half() makes)
        model.sample(classes[:2], generator=make_generator(6, "cpu"), compile=True, **kw)
        assert model._compiled.buffers is not buf                    # a graph must not read the freed weights
        ema = copy.deepcopy(model)
        assert ema._compiled.buffers is None
    finally:
        torch._dynamo.reset()


def test_save_load_gives_identical_logits(tmp_path):
    model = tiny(adaln=True)
    model.save(tmp_path / "ar")
    loaded = load_generator(tmp_path / "ar").eval()
    assert isinstance(loaded, ARGenerator) and loaded.config == model.config
    ids, classes = torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    assert torch.equal(loaded.logits(ids, classes), model.logits(ids, classes))


@pytest.mark.parametrize("name", ["ar-tiny", "ar-emoji", "ar-B", "ar-L"])
def test_configs_load(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == (f"# tessera train-generator --config configs/generator/{name}.yaml "
                                    f"--tokens TOKENS --output runs/{name}")
    run = yaml.safe_load(text)
    assert set(run) == {"model", "train"} and set(run["train"]) <= TRAIN_KEYS
    assert GeneratorConfig(**run["model"]).kind == "ar"


def old_loop_sample(model, classes, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, cfg_schedule="constant",
                    seed=0, known_ids=None, known_mask=None):
    """The decode loop as it was before the sampling moved into the compiled step: prefill, then per
    token an eager cached forward, CFG combine, ``sample_logits`` and ``keep_known``."""
    N, g, B = model.config.num_tokens, model.config.grid_size, len(classes)
    gen = make_generator(seed, "cpu")
    scales = [cfg_scale_at(cfg_scale, i / (N - 1), cfg_schedule) for i in range(N)]
    guided = any(s != 1.0 for s in scales)
    cls = torch.cat([classes, torch.full_like(classes, model.config.null_class)]) if guided else classes
    ids = torch.empty(B, N, dtype=torch.long)
    model.backbone.setup_caches(len(cls), N, torch.float32, "cpu")
    try:
        with torch.no_grad():
            logits = model.prefill(cls)
            for i in range(N):
                if i > 0:
                    prev = torch.cat([ids[:, i - 1], ids[:, i - 1]]) if guided else ids[:, i - 1]
                    logits = model.decode_one_token(prev, torch.tensor([i]), cls)
                if guided:
                    cond, uncond = logits[:B].float(), logits[B:].float()
                    logits = cond if scales[i] == 1.0 else cfg_combine(cond, uncond, scales[i])
                ids_B, _ = sample_logits(logits, temperature, top_k, top_p, gen)
                if known_mask is not None:
                    ids_B = keep_known(ids_B, known_ids.reshape(B, N)[:, i], known_mask.reshape(B, N)[:, i])
                ids[:, i] = ids_B
    finally:
        model.backbone.remove_caches()
    return ids.reshape(B, g, g)


def _inpaint_case():
    known = torch.randint(0, 32, (3, 4, 4), generator=torch.Generator().manual_seed(11))
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, 1, 1:] = True
    mask[2, 3, 3] = True
    return dict(known_ids=known, known_mask=mask, cfg_scale=2.0, top_k=6)


FUSED_CASES = {"constant-cfg-top-k": dict(cfg_scale=2.5, top_k=5),
               "linear-cfg-top-p": dict(cfg_scale=3.0, cfg_schedule="linear", top_p=0.7, temperature=0.8),
               "inpaint": _inpaint_case(),
               "greedy": dict(temperature=0.0, cfg_scale=2.0)}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_decode_step_matches_the_old_eager_loop(case, monkeypatch, caplog):
    """The step that fuses forward + guidance + filter + draw + inpainting gives the old loop's ids under
    the same seed, eagerly and through torch.compile(fullgraph=True) (backend eager on CPU: tracing must
    not break the graph, or the step would fall back with a warning)."""
    kw = FUSED_CASES[case]
    model = tiny(adaln=True)
    classes = torch.tensor([0, 1, 2])
    ref = old_loop_sample(model, classes, seed=4, **kw)
    gen = make_generator(4, "cpu")
    assert torch.equal(model.sample(classes, generator=gen, compile=False, **kw), ref)
    if kw.get("temperature") == 0.0:          # greedy draws no noise: the generator is untouched
        assert torch.equal(gen.get_state(), make_generator(4, "cpu").get_state())
    if "known_mask" in kw:
        assert torch.equal(ref[kw["known_mask"]], kw["known_ids"][kw["known_mask"]])
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **opts: real_compile(fn, backend="eager", fullgraph=True))
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="generator.autoregressive"):
            ids = model.sample(classes, generator=make_generator(4, "cpu"), compile=True, **kw)
        assert "eagerly" not in caplog.text and "capturing" not in caplog.text
        assert torch.equal(ids, ref)
    finally:
        torch._dynamo.reset()


def test_kv_slots_cover_the_filled_slots_in_buckets():
    assert [kv_slots(p, 256) for p in (0, 30, 31, 32, 200, 255)] == [32, 32, 32, 64, 224, 256]
    assert kv_slots(10, 16) == 16 and kv_slots(2, 16, bucket=4) == 4 and kv_slots(3, 16, bucket=4) == 4
    assert all(kv_slots(p, 256) > p for p in range(256))          # the slot written at p is always read


@pytest.mark.parametrize("bucket", [1, 4])
def test_reading_only_the_filled_slots_keeps_the_ids(bucket, monkeypatch):
    """Attention over the first kv_slots(p) slots (empty ones are masked out anyway) draws the ids of the
    loop that reads the whole cache."""
    kw = dict(cfg_scale=2.0, top_k=6)
    model, classes = tiny(adaln=True), torch.tensor([0, 1, 2])
    ref = old_loop_sample(model, classes, seed=3, **kw)
    monkeypatch.setattr(autoregressive, "KV_BUCKET", bucket)
    assert torch.equal(model.sample(classes, generator=make_generator(3, "cpu"), compile=False, **kw), ref)


def test_autocast_weights_give_the_same_ids_under_autocast():
    """Linear weights stored in bf16 are what bf16 autocast casts them to on every call: the same logits
    and the same sampled ids; embeddings and norm gains stay float32."""
    model, classes = tiny(adaln=True), torch.tensor([0, 1, 2])
    ids = torch.randint(0, 32, (3, 16))
    kw = dict(cfg_scale=2.0, top_k=6)
    assert model.compiled_once(lambda: "built for fp32") == "built for fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(ids, classes)
        ref = model.sample(classes, generator=make_generator(2, "cpu"), compile=False, **kw)
        model.autocast_weights(torch.bfloat16)
    assert model.compiled_once(lambda: "rebuilt") == "rebuilt"       # nothing compiled for the old weights stays
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.logits(ids, classes), logits)
        assert torch.equal(model.sample(classes, generator=make_generator(2, "cpu"), compile=False, **kw), ref)
    assert model.head.weight.dtype == model.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.tok_emb.weight.dtype == model.backbone.norm.weight.dtype == torch.float32


def test_decode_step_traces_as_one_graph():
    """torch.compile(fullgraph=True) of the whole step (forward over the first 4 cache slots, CFG, top-k,
    top-p, softmax, noise divide, argmax, known tokens) raises on any graph break; its outputs equal the
    eager step's."""
    model = tiny(adaln=True)
    B, N = 2, model.config.num_tokens
    classes = torch.tensor([0, 2, 3, 3])                              # doubled [cond; null]
    scales_N = torch.linspace(1.0, 3.0, N)
    known_BN = torch.randint(0, 32, (B, N))
    mask_BN = torch.rand(B, N) < 0.5
    torch._dynamo.reset()
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    try:
        for args in [(scales_N, exponential_noise((B, 32), make_generator(0, "cpu"), "cpu"), known_BN, mask_BN,
                      0.9, 5, 0.8),
                     (scales_N, None, None, None, 0.0, 0, 1.0)]:
            outs = []
            for fn in (model.decode_step, step):
                model.backbone.setup_caches(2 * B, N, torch.float32, "cpu")
                with torch.no_grad():
                    model.prefill(classes)
                    outs.append(fn(torch.tensor([1, 4, 1, 4]), torch.tensor([1]), classes, model.causal[:, :4], *args))
                model.backbone.remove_caches()
            (ids, nxt), (ids_c, nxt_c) = outs
            assert ids.shape == (B,) and torch.equal(nxt, torch.cat([ids, ids]))
            assert torch.equal(ids_c, ids) and torch.equal(nxt_c, nxt)
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_cuda_sampling_matches_eager(caplog):
    model = tiny(adaln=True).cuda()
    classes = torch.tensor([0, 1, 2, 1], device="cuda")
    with caplog.at_level(logging.WARNING, logger="generator.autoregressive"):
        for kw in (dict(), dict(cfg_scale=3.0, top_k=8), _inpaint_case() | dict(cfg_scale=1.5)):
            kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
            n = 3 if "known_ids" in kw else 4
            eager = model.sample(classes[:n], generator=make_generator(0, "cuda"), compile=False, **kw)
            for call in range(3):      # first call compiles, the second captures the CUDA graphs, then replays
                ids = model.sample(classes[:n], generator=make_generator(0, "cuda"), compile=True, **kw)
                assert torch.equal(ids, eager)
                assert bool(model._compiled._graphs) == (call > 0)
    assert "eagerly" not in caplog.text and "capturing" not in caplog.text
