"""How runs become results: ratios pair our rows with a peer of the same run only (an anchor from another
run is shown, never counted as met), and the device's results file keeps every run's rows."""
import json

import pytest

from benchmarks import run_all
from benchmarks.peers import ratios


def sample_row(run_id, images_per_s, steps=16):
    return {"bench": "sample", "model": "masked-B", "steps": steps, "decode": False, "batch": 64,
            "images_per_s": images_per_s, "run_id": run_id, "name": f"masked-B @{steps}", "device": "NVIDIA H200"}


def peer_row(run_id, images_per_s):
    return {"bench": "peer", "peer_key": "lg-B-compiled", "batch": 64, "images_per_s": images_per_s,
            "run_id": run_id, "name": "peer LlamaGen GPT-B compiled"}


def test_a_ratio_is_met_only_against_a_peer_of_the_same_run():
    rows = [sample_row("a", 260.0), peer_row("a", 170.0), sample_row("b", 254.2)]      # run b ran no peer
    by_run = {r["run_id"]: r for r in ratios(rows) if r["ratio"].startswith("masked@16")}
    assert by_run["a"]["same_run"] and by_run["a"]["met"] is True
    assert by_run["a"]["value"] == pytest.approx(260 / 170) and by_run["a"]["device"] == "NVIDIA H200"
    assert not by_run["b"]["same_run"] and by_run["b"]["met"] is None      # 254.2 / the H100 anchor 169.3
    assert by_run["b"]["peer_source"].startswith("anchor")
    slow = ratios([sample_row("c", 250.0), peer_row("c", 194.0)])[0]
    assert slow["same_run"] and slow["met"] is False


def test_the_results_file_keeps_earlier_runs_and_replaces_a_runs_own_rows(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    first = {"run_id": "a", "rows": [sample_row("a", 260.0), peer_row("a", 170.0)],
             "jobs": [{"job": "peers", "status": "ok", "run_id": "a"}]}
    path.write_text(json.dumps(run_all.accumulate(path, first)))
    partial = {"run_id": "b", "rows": [sample_row("b", 250.0)], "jobs": [{"job": "sample", "run_id": "b"}]}
    path.write_text(json.dumps(run_all.accumulate(path, partial)))
    done = {"run_id": "b", "rows": [sample_row("b", 250.0), peer_row("b", 194.0)],     # the same run, one job on
            "jobs": [{"job": "sample", "run_id": "b"}, {"job": "peers", "run_id": "b"}]}
    merged = run_all.accumulate(path, done)
    assert [(r["run_id"], r["bench"]) for r in merged["rows"]] == [("a", "sample"), ("a", "peer"), ("b", "sample"),
                                                                     ("b", "peer")]
    assert [j["job"] for j in merged["jobs"]] == ["peers", "sample", "peers"]
    assert merged["merged_from"] == ["a", "b"]
    assert {(r["run_id"], r["met"]) for r in merged["ratios"]} == {("a", True), ("b", False)}
