"""The training benchmark's batches (smoke run on the CPU): the eager step at its batch, the compiled step at
that batch and at twice it (or 1.5x where twice runs out of memory), and the data wait at the largest batch the
compiled step ran."""
from types import SimpleNamespace

import pytest
import torch

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
