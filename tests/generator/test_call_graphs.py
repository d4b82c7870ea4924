"""CallGraphs: which call runs as is, which records and which replays, per key; a failed capture falls back
for good; and on a GPU, MaskedGenerator.sample(compile=True)'s recorded calls give the ids and leave the
generator where the unrecorded first call does. On the CPU a stand-in records: it replays ``fn`` on the
copies of the inputs it was recorded with, as a graph reads its static inputs."""
import copy
import logging
import time

import pytest
import torch
import torch.nn as nn

from generator import masked
from generator.call_graphs import CallGraphs
from tests.generator.test_masked import G, V, randomised, tiny

CPU = torch.device("cpu")


class StandIn:
    """Records nothing: ``replay`` copies the inputs into the recorded ones and calls ``fn`` on those."""
    recorded = []

    def __init__(self, fn, inputs, device, pool):
        self.fn, self.inputs = fn, tuple(None if x is None else x.clone() for x in inputs)
        StandIn.recorded.append(self)

    def replay(self, inputs, generator):
        for static, x in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(x)
        return self.fn(*self.inputs, generator).clone()


@pytest.fixture
def graphs():
    StandIn.recorded = []
    return CallGraphs("test call", logging.getLogger("test"), max_graphs=2, record=StandIn)


def counting(calls):
    def fn(x, y, generator):
        calls.append(x)
        return x * 2 + torch.rand(x.shape, generator=generator)
    return fn


def test_first_call_runs_as_is_second_records_then_replays(graphs):
    calls, module, g = [], nn.Linear(2, 2), torch.Generator().manual_seed(0)
    fn = counting(calls)
    x = torch.arange(3.0)
    graphs(fn, "k", module, (x, None), g, CPU)
    assert len(graphs) == 0 and calls[-1] is x                      # run on the caller's tensor
    graphs(fn, "k", module, (x, None), g, CPU)
    assert len(graphs) == 1 and calls[-1] is StandIn.recorded[0].inputs[0]
    out = graphs(fn, "k", module, (x + 10, None), g, CPU)           # new values in the recorded inputs
    assert len(StandIn.recorded) == 1 and torch.equal(StandIn.recorded[0].inputs[0], x + 10)
    assert torch.all(out >= 2 * (x + 10)) and torch.all(out < 2 * (x + 10) + 1)


def test_a_replay_marks_its_start_on_the_host_clock(graphs):
    """What ``sample-masked-host`` reads: the host clock as the last replay began; runs without one leave it."""
    fn, module, g, x = counting([]), nn.Linear(2, 2), torch.Generator(), torch.zeros(2)
    graphs(fn, "k", module, (x, None), g, CPU)                       # as is: nothing replayed
    assert graphs.replay_started_at is None
    graphs(fn, "k", module, (x, None), g, CPU)                       # recorded, then replayed
    before = time.perf_counter()
    graphs(fn, "k", module, (x, None), g, CPU)
    assert before <= graphs.replay_started_at <= time.perf_counter()


@pytest.mark.parametrize("change", ["key", "shape", "dtype", "none input", "autocast", "weights moved"])
def test_a_new_key_runs_as_is_then_records_its_own(graphs, change):
    module, g, calls = nn.Linear(2, 2), torch.Generator(), []
    fn = counting(calls)
    x, y, key = torch.zeros(3), torch.zeros(1), "k"
    for _ in range(2):
        graphs(fn, key, module, (x, y), g, CPU)
    assert len(StandIn.recorded) == 1
    if change == "key":
        key = "other"
    elif change == "shape":
        x = torch.zeros(4)
    elif change == "dtype":
        x = torch.zeros(3, dtype=torch.float64)
    elif change == "none input":
        y = None
    elif change == "weights moved":
        module.to(torch.float64)                                   # new storage: a graph would read freed memory

    def call():
        if change == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return graphs(fn, key, module, (x, y), g, CPU)
        return graphs(fn, key, module, (x, y), g, CPU)
    call()
    assert len(StandIn.recorded) == 1                               # first call of the new key: as is
    call()
    assert len(StandIn.recorded) == 2


def test_in_place_weight_updates_keep_the_graph(graphs):
    module, g = nn.Linear(2, 2), torch.Generator()
    fn = counting([])
    for _ in range(2):
        graphs(fn, "k", module, (torch.zeros(3), None), g, CPU)
    module.load_state_dict({k: v + 1 for k, v in module.state_dict().items()})   # copied into the same storage
    graphs(fn, "k", module, (torch.zeros(3), None), g, CPU)
    assert len(StandIn.recorded) == 1


def test_past_max_graphs_all_are_dropped(graphs):
    module, g = nn.Linear(2, 2), torch.Generator()
    fn = counting([])
    for key in ("a", "b", "c"):
        for _ in range(2):
            graphs(fn, key, module, (torch.zeros(3), None), g, CPU)
    assert len(graphs) == 1 and len(StandIn.recorded) == 3        # a and b dropped when c recorded


def test_a_failed_capture_warns_once_and_runs_without_graphs(caplog):
    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")
    graphs = CallGraphs("test call", logging.getLogger("test"), record=broken)
    module, g, calls = nn.Linear(2, 2), torch.Generator().manual_seed(0), []
    fn = counting(calls)
    with caplog.at_level(logging.WARNING, logger="test"):
        outs = [graphs(fn, "k", module, (torch.zeros(3), None), g, CPU) for _ in range(4)]
    assert caplog.text.count("recording the test call as a CUDA graph failed") == 1
    assert "not permitted when stream is capturing" in caplog.text
    assert graphs.failed and len(calls) == 4 and all(o.shape == (3,) for o in outs)


def test_a_copy_records_its_own(graphs):
    module, g = nn.Linear(2, 2), torch.Generator()
    for _ in range(2):
        graphs(counting([]), "k", module, (torch.zeros(3), None), g, CPU)
    clone = copy.deepcopy(graphs)
    assert len(clone) == 0 and len(graphs) == 1 and clone.record is StandIn


def test_the_masked_sampler_builds_its_call_graphs_once_per_switch(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = randomised(tiny())
    first = model._sampling_fns(compile=True)
    assert isinstance(first[4], CallGraphs) and model._sampling_fns(compile=True) is first
    monkeypatch.setattr(masked, "CALL_GRAPHS", False)               # read by the build: another variant
    assert model._sampling_fns(compile=True) is not first
    assert model._sampling_fns(compile=False)[4] is None


def test_the_forward_compile_options_reach_torch_compile_and_rebuild(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    model = randomised(tiny())
    first = model._sampling_fns(compile=True)
    assert calls == [masked.MaskedGenerator.forward_compile_options, dict(fullgraph=True)] * 2   # CPU: no graphs
    options = {"options": {"max_autotune": True}}                 # a dict value: the variant key still hashes
    monkeypatch.setattr(masked.MaskedGenerator, "forward_compile_options", options)
    assert model._sampling_fns(compile=True) is not first
    assert calls[4:] == [options, dict(fullgraph=True)] * 2


# ---- on a GPU: real captures ------------------------------------------------------------------------------
def cuda_gen(seed):
    return torch.Generator("cuda").manual_seed(seed)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(cfg_scale=2.0), dict(), dict(cfg_scale=2.0, sampler="ancestral"),
                                dict(cfg_scale=2.0, inpaint=True)])
def test_gpu_recorded_calls_give_the_first_calls_ids_and_generator_state(kw, caplog):
    kw = dict(kw)
    model = randomised(tiny()).cuda()
    if kw.pop("inpaint", False):
        kw.update(known_ids=torch.randint(0, V, (3, G, G)), known_mask=torch.rand(3, G, G) < 0.5)
    ids, states = [], []
    with caplog.at_level(logging.WARNING, logger="generator.masked"), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):                                 # as is, recorded + replayed, replayed
            g = cuda_gen(7)
            ids.append(model.sample([0, 1, 2], num_steps=5, compile=True, generator=g, **kw))
            states.append(g.get_state())
        other = model.sample([0, 1, 2], num_steps=5, compile=True, generator=cuda_gen(8), **kw)
    assert "failed" not in caplog.text
    assert len(model._sampling_fns(compile=True)[4]) == 1
    assert torch.equal(ids[1], ids[0]) and torch.equal(ids[2], ids[0])
    assert torch.equal(states[1], states[0]) and torch.equal(states[2], states[0])
    assert not torch.equal(other, ids[0])                  # the replay draws from the caller's seed
    if "known_mask" in kw:
        assert torch.equal(ids[2].cpu()[kw["known_mask"]], kw["known_ids"][kw["known_mask"]])


@pytest.mark.gpu
def test_gpu_default_generator_and_weights_in_new_storage():
    model = randomised(tiny()).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ids = []
        for _ in range(3):
            torch.cuda.manual_seed(3)
            ids.append(model.sample([1, 2], num_steps=4, cfg_scale=2.0, compile=True))
        after = torch.cuda.default_generators[torch.cuda.current_device()].get_state()
        torch.cuda.manual_seed(3)
        model.sample([1, 2], num_steps=4, cfg_scale=2.0, compile=True)
        assert torch.equal(torch.cuda.default_generators[torch.cuda.current_device()].get_state(), after)
        assert torch.equal(ids[1], ids[0]) and torch.equal(ids[2], ids[0])
        for p in model.parameters():                      # new storage, the same values: recorded again
            p.data = p.data.clone()
        again = [model.sample([1, 2], num_steps=4, cfg_scale=2.0, compile=True, generator=cuda_gen(3))
                 for _ in range(3)]
    assert len(model._sampling_fns(compile=True)[4]) == 2
    assert torch.equal(again[1], again[0]) and torch.equal(again[2], again[0])


def test_storage_key_sees_casts_moves_and_replaced_parameters():
    from generator.call_graphs import storage_key
    module = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    module.register_buffer("table", torch.zeros(4))
    key = storage_key(module)
    assert len(key) == 5 and storage_key(module) == key
    assert len(storage_key(module, skip=nn.Linear)) == 1              # scratch modules (KV caches) left out
    module[0].weight.data.add_(1.0)                                # in place: the same key
    assert storage_key(module) == key
    module[2].bias = nn.Parameter(torch.zeros(1))                  # a new parameter: a new key
    assert storage_key(module) != key
    key = storage_key(module)
    module.to(torch.float64)
    assert storage_key(module) != key
    key = storage_key(module)
    module.register_module("absent", None)                         # an empty slot is no storage
    assert storage_key(module) == key
    del module[2]                                                  # a deleted submodule: a new key
    assert storage_key(module) != key and len(storage_key(module)) == 3
