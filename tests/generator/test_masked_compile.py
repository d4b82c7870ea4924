"""MaskedGenerator.sample(compile=True) on the CPU: the confidence update traces with fullgraph=True
(no graph break), the compiled path gives the eager ids under the same seed, failures fall back to
eager with a warning, and the compiled functions are cached per module. The 'eager' dynamo backend
traces exactly as a real compile would but runs the captured graph with eager kernels (seconds)."""
import copy
import logging
import shutil

import pytest
import torch

from generator.masked import MaskedGenerator, confidence_noise, confidence_update
from tests.generator.test_masked import G, V, gen, randomised, tiny

FALLBACK = "running it eagerly"
REAL_COMPILE = torch.compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts and ends with empty dynamo caches (recompile limits count per code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_compile(graphs: list):
    """A torch.compile stand-in that appends every graph dynamo traces to ``graphs`` and runs it eagerly."""
    def compile(fn, **kw):
        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        return REAL_COMPILE(fn, backend=backend, fullgraph=kw.get("fullgraph", False))
    return compile


def eager_backend(fn, **kw):
    """A torch.compile stand-in: the real dynamo trace (fullgraph as asked) with the 'eager' backend."""
    return REAL_COMPILE(fn, backend="eager", fullgraph=kw.get("fullgraph", False))


@pytest.mark.parametrize("opts", [dict(), dict(cfg_scale=2.5, temperature=0.8, top_k=6, top_p=0.9),
                                  dict(cfg_scale=2.0, temperature=0.0)])
def test_confidence_update_traces_without_graph_breaks(opts):
    """fullgraph=True raises at any graph break: this call is the proof that the update has none."""
    B, L = 3, 12
    cfg = opts.pop("cfg_scale", None)
    logits = torch.randn(2 * B if cfg else B, L, V)
    ids = torch.where(torch.rand(B, L) < 0.3, torch.randint(0, V, (B, L)), V)
    remain = torch.tensor([5, 0, 11])
    exp, choice = confidence_noise((B, L, V), 0.5, "cpu", temperature=opts.get("temperature", 1.0), generator=gen(0))
    args = (logits, ids, remain, exp, choice)
    kw = dict(mask_id=V, cfg_scale=cfg, **opts)
    compiled = REAL_COMPILE(confidence_update, backend="eager", fullgraph=True)
    assert torch.equal(compiled(*args, **kw), confidence_update(*args, **kw))
    assert torch.equal(compiled(*args[:4], None, **kw), confidence_update(*args[:4], None, **kw))   # last step


@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=2.0, cfg_schedule="linear"),
                                dict(cfg_scale=3.0, temperature=0.0, top_k=4), dict(top_p=0.8, schedule="arccos"),
                                dict(cfg_scale=2.0, inpaint=True), dict(cfg_scale=2.0, sampler="ancestral")])
def test_compiled_sample_gives_the_eager_ids(kw, monkeypatch, caplog):
    kw = dict(kw)
    model = randomised(tiny(schedule=kw.pop("schedule", "cosine")))
    if kw.pop("inpaint", False):
        kw.update(known_ids=torch.randint(0, V, (3, G, G)), known_mask=torch.rand(3, G, G) < 0.5)
    eager = model.sample([0, 1, 2], num_steps=5, generator=gen(1), **kw)
    monkeypatch.setattr(torch, "compile", eager_backend)
    with caplog.at_level(logging.WARNING, logger="generator.masked"):
        compiled = model.sample([0, 1, 2], num_steps=5, generator=gen(1), compile=True, **kw)
    assert torch.equal(compiled, eager)
    assert FALLBACK not in caplog.text
    assert all(fn.compiled for fn in model._compiled[:4])             # still compiled after every step
    if "known_mask" in kw:
        assert torch.equal(compiled[kw["known_mask"]], kw["known_ids"][kw["known_mask"]])


def test_every_step_count_shares_the_compiled_graphs(monkeypatch, caplog):
    """The head runs at a different number of positions each step, marked dynamic: the forward and the
    update each trace one graph for every count from the first call (plus, at this tiny size, the count
    1 that dynamo specialises and the update's last step without Gumbel noise), instead of a static
    graph first; the first guided step (B + 1 sequences) has a forward and an update of its own, one graph
    each; 16, 8 and 5 steps at two batch sizes stay compiled (no fallback) with the eager ids."""
    model = randomised(tiny())
    graphs = []

    monkeypatch.setattr(torch, "compile", counting_compile(graphs))
    model.sample([0, 1, 2], num_steps=16, cfg_scale=2.0, generator=gen(0), compile=True)
    model.sample([0, 1, 2], num_steps=8, cfg_scale=2.0, generator=gen(0), compile=True)
    assert len(graphs) == 5 + 2                     # 5 + 2 more without the marks: a static graph each first
    calls = [(b, n) for n in (16, 8, 5) for b in (3, 1)]
    eager = [model.sample(list(range(b)), num_steps=n, cfg_scale=2.0, generator=gen(n)) for b, n in calls]
    with caplog.at_level(logging.WARNING, logger="generator.masked"):
        compiled = [model.sample(list(range(b)), num_steps=n, cfg_scale=2.0, generator=gen(n), compile=True)
                    for b, n in calls]
    assert FALLBACK not in caplog.text and all(fn.compiled for fn in model._compiled[:4])
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def cpu_fresh_noise(monkeypatch) -> None:
    """The sampler's CUDA path with the noise made in the draw (NOTES A46), on the CPU: the draw and the noise
    replaced by torch ops of the same shapes (what the compiled update sees), the generator's state a stand-in."""
    from generator import fused_draw, masked, philox_noise

    def draw(logits, positions, stream, B, L, cfg_scale, temperature):
        stream.take(B * L * logits.shape[-1])
        guided = logits[:B].float() if cfg_scale is None else logits[:B].float() * cfg_scale
        return guided.argmax(-1), guided.log_softmax(-1).amax(-1)
    monkeypatch.setattr(fused_draw, "use_noise_kernel", lambda *args: True)
    monkeypatch.setattr(fused_draw, "noise_draw", draw)
    monkeypatch.setattr(masked, "cuda_generator", lambda generator, device: generator)
    monkeypatch.setattr(masked, "confidence_noise_increment", lambda *args: 0)
    monkeypatch.setattr(philox_noise, "state_of", lambda generator, device: torch.zeros(2, dtype=torch.int64))
    monkeypatch.setattr(philox_noise, "advance", lambda generator, increment: None)
    monkeypatch.setattr(philox_noise, "exponential", lambda shape, stream: torch.empty(shape).exponential_())
    monkeypatch.setattr(philox_noise.NoiseStream, "layout", lambda self, n: philox_noise.layout_for(n, 1056))


def test_the_drawn_candidates_share_the_compiled_graphs_too(monkeypatch, caplog):
    """With the noise made in the draw the update takes the candidates and their log p, (B, M), drawn before
    it: marked dynamic in M like the positions, so the update traces as many graphs as with stored noise.
    Unmarked, torch 2.11 traced one per step's M until dynamo's recompile limit sent the update back to eager
    for good (session 24's batch-1 rows on an H100); dynamo without automatic dynamic shapes does that here."""
    graphs = []

    def traced_graphs() -> int:
        graphs.clear()
        torch._dynamo.reset()
        model = randomised(tiny(grid_size=8))
        with caplog.at_level(logging.WARNING, logger="generator.masked"):
            for b, n in [(3, 16), (3, 8), (1, 16), (1, 16)]:
                model.sample(list(range(b)), num_steps=n, cfg_scale=2.0, generator=gen(0), compile=True)
        assert FALLBACK not in caplog.text and all(fn.compiled for fn in model._compiled[:4])
        return len(graphs)

    monkeypatch.setattr(torch, "compile", counting_compile(graphs))
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        stored = traced_graphs()
        cpu_fresh_noise(monkeypatch)
        assert traced_graphs() == stored


@pytest.mark.parametrize("where", ["build", "first call"])
def test_compile_failure_falls_back_to_eager(where, monkeypatch, caplog):
    model = randomised(tiny())

    def broken(fn, **kw):
        if where == "build":
            raise RuntimeError("no compiler here")

        def call(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return call

    eager = model.sample([0, 1], num_steps=4, cfg_scale=2.0, generator=gen(5))
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="generator.masked"):
        ids = model.sample([0, 1], num_steps=4, cfg_scale=2.0, generator=gen(5), compile=True)
    assert torch.equal(ids, eager)
    assert "forward failed" in caplog.text and "confidence update failed" in caplog.text
    assert "first-step forward failed" in caplog.text and "first-step update failed" in caplog.text
    assert caplog.text.count(FALLBACK) == 4                        # once each, then eager for good
    assert not any(fn.compiled for fn in model._compiled[:4])


def test_compiled_fns_are_cached_per_module_and_not_shared_by_a_copy(monkeypatch):
    calls = []

    def fake_compile(fn, **kw):                                    # records the options, compiles nothing
        calls.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = randomised(tiny())
    keys, modules = list(model.state_dict()), len(list(model.modules()))
    model.sample([0], num_steps=3, compile=True)
    model.sample([1, 2], num_steps=3, compile=True, cfg_scale=2.0)
    # CPU: forwards with the forward options, no graphs of their own; updates fullgraph
    assert calls == [MaskedGenerator.forward_compile_options, dict(fullgraph=True)] * 2
    assert list(model.state_dict()) == keys and len(list(model.modules())) == modules   # plain Python state
    assert model.sample([0], num_steps=3).shape == (1, G, G) and len(calls) == 4   # compile=False builds nothing
    ema = copy.deepcopy(model)                                     # an EMA copy must not run the original's weights
    for p in ema.parameters():
        p.data.mul_(-1.0)
    assert torch.equal(ema.sample([0, 1], num_steps=3, compile=True, generator=gen(0)),
                       ema.sample([0, 1], num_steps=3, generator=gen(0)))
    assert len(calls) == 8 and ema._compiled is not model._compiled


@pytest.mark.gpu
def test_gpu_compiled_sampling_runs(caplog):
    """Real inductor + CUDA graphs: valid ids, no fallback (kernels may round differently from eager)."""
    model = randomised(tiny()).cuda()
    with caplog.at_level(logging.WARNING, logger="generator.masked"), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):                                         # second call: cached, CUDA graphs replayed
            ids = model.sample([0, 1], num_steps=4, cfg_scale=2.0, compile=True,
                               generator=torch.Generator("cuda").manual_seed(0))
    assert ((ids >= 0) & (ids < V)).all()
    assert FALLBACK not in caplog.text
    assert all(fn.compiled for fn in model._compiled[:4])


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor's CPU kernels need a C++ compiler")
def test_the_forward_options_give_inductor_defaults_logits_bit_for_bit():
    """``forward_compile_options`` (NOTES A43: the residual stream written once per block instead of once every
    second block) changes where inductor stores float32 sums, not the sums: real inductor kernels on the CPU
    under bf16 autocast, logits at every position and at a sampler's masked positions, equal to the last bit."""
    model = randomised(tiny(depth=6, dim=64, heads=4))
    for p in model.parameters():
        p.data.normal_(0, 0.3, generator=gen(5))
    known = torch.rand(3, G * G, generator=gen(1)) < 0.5
    ids = torch.where(known, torch.randint(0, V, (3, G * G), generator=gen(2)), V)
    classes, positions = torch.tensor([0, 1, 2]), torch.argsort(torch.rand(3, G * G, generator=gen(3)), 1)[:, :7]
    logits = []
    for options in (MaskedGenerator.forward_compile_options, {}):
        torch._dynamo.reset()
        forward = REAL_COMPILE(model.forward, **options)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits.append((forward(ids, classes), forward(ids, classes, positions)))
    assert MaskedGenerator.forward_compile_options["options"]["realize_reads_threshold"] == 2
    assert all(torch.equal(a, b) for a, b in zip(*logits))


@pytest.mark.parametrize("cfg_scale, expected", [(1.0, ["rest"] * 3), (2.0, ["first", "rest", "rest"])])
def test_only_the_first_guided_step_of_a_shared_start_runs_the_first_step_functions(monkeypatch, cfg_scale, expected):
    """The first-step functions are for the first guided step's B + 1 sequences (SHARE_FIRST_UNCOND); an
    unguided step runs B sequences, as every later step does, through the others."""
    model = randomised(tiny())
    calls = []

    def tagged(name, fn):
        def call(*args, **kw):
            calls.append(name)
            return fn(*args, **kw)
        return call

    monkeypatch.setattr(model, "_sampling_fns", lambda compile: (
        tagged("rest", model.forward), confidence_update, tagged("first", model.forward), confidence_update, None))
    model.sample([0, 1, 2], num_steps=3, cfg_scale=cfg_scale, generator=gen(0))
    assert calls == expected
