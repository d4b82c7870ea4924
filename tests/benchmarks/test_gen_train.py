"""The training benchmark's batches (smoke run on the CPU): the eager step at its batch, the compiled step at
that batch and at twice it (or 1.5x where twice runs out of memory), and the data wait at the largest batch the
compiled step ran."""
from types import SimpleNamespace

import pytest
import torch
import torch._functorch.config

from benchmarks import gen_train
from benchmarks.common import RowSink


def run(monkeypatch, part: str, oom_at: tuple[int, ...] | int = ()) -> dict[str, dict]:
    monkeypatch.delenv("TESSERA_TRAIN_BATCH", raising=False)
    monkeypatch.setattr(gen_train, "DATA_STEPS", 1)
    oom_at = (oom_at,) if isinstance(oom_at, int) else oom_at
    if oom_at:                  # the step at these batches runs out of memory, as a GPU would
        step_call = gen_train.Step.__call__

        def step(self, ids_BL, labels_B):
            if ids_BL.shape[0] in oom_at:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step_call(self, ids_BL, labels_B)
        monkeypatch.setattr(gen_train.Step, "__call__", step)
    sink = RowSink(None, f"train {part}", smoke=True)
    gen_train.train_model(part, SimpleNamespace(smoke=True, profile=False), sink)
    return {r["name"]: r for r in sink.rows}


def test_the_compiled_step_runs_at_the_eager_batch_and_at_twice_it(monkeypatch):
    rows = run(monkeypatch, "masked-L")
    eager, same = rows["masked-L train eager"], rows["masked-L train compiled"]
    double = rows["masked-L train compiled b8"]
    assert (eager["batch"], same["batch"], double["batch"]) == (4, 4, 8)
    assert not any("error" in r for r in rows.values())
    assert double["tokens_per_s"] == pytest.approx(8 * double["seq_len"] / double["median_s"])
    assert double["compute_floor_s"] == pytest.approx(2 * same["compute_floor_s"])    # FLOPs of twice the tokens
    assert rows["masked-L train data wait"]["batch"] == 8 and "masked-L train compiled b6" not in rows


def test_a_compiled_batch_that_does_not_fit_tries_one_and_a_half_times(monkeypatch):
    rows = run(monkeypatch, "masked-L", oom_at=8)
    double = rows["masked-L train compiled b8"]
    assert "median_s" not in double and "error" not in double and "out of memory" in double["note"]
    assert rows["masked-L train compiled b6"]["batch"] == 6 and "median_s" in rows["masked-L train compiled b6"]
    assert rows["masked-L train data wait"]["batch"] == 6


def test_the_eager_batch_stays_where_no_larger_one_fits(monkeypatch):
    rows = run(monkeypatch, "masked-L", oom_at=(8, 6))
    assert {"masked-L train compiled b8", "masked-L train compiled b6"} <= set(rows)
    assert rows["masked-L train compiled"]["batch"] == 4 and "median_s" in rows["masked-L train compiled"]
    assert rows["masked-L train data wait"]["batch"] == 4


def test_one_batch_set_by_hand_runs_once_compiled(monkeypatch):
    monkeypatch.setattr(gen_train, "DATA_STEPS", 1)
    monkeypatch.setenv("TESSERA_TRAIN_BATCH", "2")
    sink = RowSink(None, "train ar-L", smoke=True)
    gen_train.train_model("ar-L", SimpleNamespace(smoke=True, profile=False), sink)
    assert [r["name"] for r in sink.rows] == ["ar-L train eager", "ar-L train compiled", "ar-L train data wait"]
    assert all(r["batch"] == 2 and "error" not in r for r in sink.rows)


def test_the_alone_sweep_traces_each_threshold_afresh(monkeypatch):
    """``--var-alone-sweep``: one compiled step traced again for every threshold (dynamo guards on
    generator.var.ALONE_TOKENS, read while tracing), each graph with the attention calls that threshold groups
    into; the first threshold runs again last, on its first graph. Tiny VAR: scales 1, 2, 4 (blocks of 1, 4 and
    16 tokens)."""
    import generator.var
    calls_per_graph = []

    def counting(gm, example_inputs):
        calls_per_graph.append(sum(n.target is torch.nn.functional.scaled_dot_product_attention
                                   for n in gm.graph.nodes))
        return gm.forward
    monkeypatch.setattr(gen_train, "compiled", lambda fn, mode, smoke: torch.compile(fn, backend=counting))
    monkeypatch.setattr(generator.var, "ALONE_TOKENS", generator.var.ALONE_TOKENS)   # restored after the sweep
    sink = RowSink(None, "train var-d16", smoke=True)
    gen_train.variant_sweep("var-d16", SimpleNamespace(smoke=True, profile=False), sink,
                            gen_train.alone_variants([4, 1024, 16], smoke=True))
    depth = gen_train.load_config("var-d16", smoke=True)["model"].depth
    # >= 4: the 1-token block alone, then the 4- and 16-token blocks (3 calls); >= 1024: one masked call over all
    # 21 tokens; >= 16: the 1- and 4-token blocks masked, then the 16-token block (2 calls); the repeat: no new graph
    assert [c for c in calls_per_graph if c] == [3 * depth, depth, 2 * depth]
    assert [r["name"] for r in sink.rows] == [f"var-d16 train compiled [alone>={n}]" for n in (4, 1024, 16)] + [
        "var-d16 train compiled [alone>=4] again"]
    assert [r["alone_tokens"] for r in sink.rows] == [4, 1024, 16, 4]
    assert all(r["batch"] == 4 and r["median_s"] > 0 and "error" not in r for r in sink.rows)


def test_the_compile_sweep_compiles_each_variant_afresh(monkeypatch):
    """``--compile-sweep``: the step compiled anew under each named variant, in order, then the first again; each
    row records its inductor options and switches; a variant's switch is put back for the next; ``--profile``
    profiles the first variant only."""
    from generator import fused_adaln
    compiles = []

    def recording(fn, mode, smoke, options=None):
        compiles.append((options, fused_adaln.ENABLED))
        return torch.compile(fn, backend="eager")
    monkeypatch.setattr(gen_train, "compiled", recording)
    monkeypatch.setattr(fused_adaln, "ENABLED", True)
    sink = RowSink(None, "train ar-L", smoke=True)
    with torch._functorch.config.patch(enable_autograd_cache=True):   # restored after: the sweep turns it off
        gen_train.variant_sweep("ar-L", SimpleNamespace(smoke=True, profile=True), sink,
                                gen_train.compile_variants(["reads2", "adaln-torch"], smoke=True))
        assert not torch._functorch.config.enable_autograd_cache   # its key misses a switch that changes the backward
    assert compiles == [({"realize_reads_threshold": 2}, True), ({}, False), ({"realize_reads_threshold": 2}, True)]
    assert [r["name"] for r in sink.rows] == [
        "ar-L train profile compiled [reads2]", "ar-L train compiled [reads2]",
        "ar-L train compiled [adaln-torch]", "ar-L train compiled [reads2] again"]
    assert [r["inductor_options"] for r in sink.rows] == [{"realize_reads_threshold": 2}] * 2 + [{}, {
        "realize_reads_threshold": 2}]
    assert sink.rows[2]["switches"] == {"generator.fused_adaln.ENABLED": False} and "switches" not in sink.rows[1]
    assert all(r["median_s"] > 0 and "error" not in r for r in sink.rows)
    with pytest.raises(SystemExit, match="unknown compile variants"):
        gen_train.compile_variants(["default", "fast"], smoke=True)
