"""VARGenerator.sample(compile=True) on the CPU: one compiled function runs each scale's whole forward
(two graphs: the 1-token first scale, then a dynamic one), gives the eager ids under the same seed,
keeps its KV caches for the next call, falls back to eager with a warning, and is rebuilt by a deepcopy.
The 'eager' dynamo backend traces exactly as a real compile would but runs the captured graph with eager
kernels (seconds)."""
import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from generator.var import join_scales
from tests.generator.test_var import RefCodec, random_ids, tiny_model

REAL_COMPILE = torch.compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def eager_backend(fn, **kw):
    """torch.compile with the options the model asks for (dynamic=True) and the 'eager' backend."""
    return REAL_COMPILE(fn, backend="eager", dynamic=kw.get("dynamic"), fullgraph=kw.get("fullgraph", False))


@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=2.0, top_k=5, top_p=0.9), dict(temperature=0.0)])
def test_compiled_sample_gives_the_eager_ids_with_two_graphs(kw, monkeypatch, caplog):
    model, codec = tiny_model(), RefCodec()
    eager = join_scales(model.sample([0, 1, 2], codec=codec, generator=torch.Generator().manual_seed(3), **kw))
    monkeypatch.setattr(torch, "compile", eager_backend)
    with caplog.at_level(logging.WARNING, logger="generator.var"):
        compiled = join_scales(model.sample([0, 1, 2], codec=codec, generator=torch.Generator().manual_seed(3),
                                            compile=True, **kw))
    assert torch.equal(compiled, eager)
    assert not caplog.records                                   # no fallback
    assert counters["stats"]["unique_graphs"] == 2              # not one per block or per scale
    model.sample([2, 0, 1], codec=codec, compile=True, **kw)    # a second call reuses them
    assert counters["stats"]["unique_graphs"] == 2


def test_the_compiled_path_keeps_its_caches_and_eager_sampling_removes_them(monkeypatch):
    """CUDA graphs read the caches in place, so a second compiled call of the same batch must write into
    the same buffers (stale contents are never read: the ids equal a fresh eager run's); another batch
    gets new ones; eager sampling leaves none behind."""
    model, codec = tiny_model(), RefCodec()
    monkeypatch.setattr(torch, "compile", eager_backend)
    caches = lambda: [b.attn.kv_cache for b in model.backbone.blocks]            # noqa: E731
    model.sample([0, 1], codec=codec, compile=True, cfg_scale=2.0)
    first = caches()
    assert all(c is not None for c in first)
    again = join_scales(model.sample([2, 0], codec=codec, compile=True, cfg_scale=2.0,
                                     generator=torch.Generator().manual_seed(5)))
    assert all(a is b for a, b in zip(caches(), first))
    model.sample([0, 1, 2], codec=codec, compile=True, cfg_scale=2.0)
    assert all(a is not b for a, b in zip(caches(), first))
    fresh = join_scales(model.sample([2, 0], codec=codec, cfg_scale=2.0, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(again, fresh) and all(c is None for c in caches())


def test_inpainting_under_compile_keeps_the_known_tokens(monkeypatch):
    model, codec = tiny_model(), RefCodec()
    known = [ids for ids in random_ids(2)]
    mask = [torch.rand(ids.shape) < 0.5 for ids in known]
    monkeypatch.setattr(torch, "compile", eager_backend)
    out = model.sample([0, 1], codec=codec, cfg_scale=2.0, known_ids=known, known_mask=mask, compile=True,
                       generator=torch.Generator().manual_seed(1))
    for o, k, m in zip(out, known, mask):
        assert torch.equal(o[m], k[m])


def test_a_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    model, codec = tiny_model(), RefCodec()
    eager = join_scales(model.sample([1, 2], codec=codec, generator=torch.Generator().manual_seed(0)))

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="generator.var"):
        out = join_scales(model.sample([1, 2], codec=codec, generator=torch.Generator().manual_seed(0), compile=True))
    assert torch.equal(out, eager)
    assert any("VAR sampler's scale forward" in r.getMessage() and "running it eagerly" in r.getMessage()
               for r in caplog.records)


def test_a_deepcopy_builds_its_own_compiled_function(monkeypatch):
    model, codec = tiny_model(), RefCodec()
    monkeypatch.setattr(torch, "compile", eager_backend)
    model.sample([0], codec=codec, compile=True)
    ema = copy.deepcopy(model)
    assert torch.equal(join_scales(ema.sample([0, 1], codec=codec, compile=True, generator=torch.Generator().manual_seed(0))),
                       join_scales(model.sample([0, 1], codec=codec, generator=torch.Generator().manual_seed(0))))
    assert ema._compiled is not model._compiled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (inductor kernels)")
def test_compiled_cuda_sampling_is_seeded_and_close_to_eager():
    """Real inductor kernels and CUDA graphs on a GPU: the same seed gives the same ids run to run (the
    second call replays the graphs recorded by the first), and compiled ids agree with eager ones except
    where different rounding flips a near-tie draw."""
    model, codec = tiny_model().cuda(), RefCodec()
    codec.embed_VC = codec.embed_VC.cuda()
    draw = lambda compile: join_scales(model.sample([0, 1, 2, 3], codec=codec, cfg_scale=2.0, compile=compile,  # noqa: E731
                                                    generator=torch.Generator("cuda").manual_seed(7)))
    eager, first, second = draw(False), draw(True), draw(True)
    assert torch.equal(first, second)
    assert (first == eager).float().mean() >= 0.95
    # another batch replaces the kept caches; back at the first batch the graphs must not read freed ones
    model.sample([0, 1], codec=codec, cfg_scale=2.0, compile=True)
    assert torch.equal(draw(True), first)
