"""How runs become results: ratios pair our rows with a peer of the same run only (an anchor from another
run is shown, never counted as met), and the device's results file keeps every run's rows."""
import json
import os

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


def test_a_jobs_compile_fallbacks_are_read_from_its_own_output(tmp_path):
    """Session 24's masked job logged dynamo's recompile limit and the update running eagerly, and no row said so:
    each job's result now lists such lines of its own output (not an earlier job's, in the same log file)."""
    (tmp_path / "fake_job.py").write_text(
        "import sys\n"
        "print('ROW {}')\n"
        "if 'fallback' in sys.argv:\n"
        "    print('W1205 torch/_dynamo/convert_frame.py:1743] [3/16] torch._dynamo hit config.recompile_limit (16)')\n"
        "    print(\"WARNING generator.masked: torch.compile of the masked sampler's confidence update failed \"\n"
        "          \"(FailOnRecompileLimitHit: Hard failure due to fullgraph=True); running it eagerly\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    with open(tmp_path / "bench.log", "a") as log:
        first = run_all.run_job(run_all.Job("a", "fake_job", ["fallback"], 10), False, tmp_path / "rows", log, 60, env)
        second = run_all.run_job(run_all.Job("b", "fake_job", [], 10), False, tmp_path / "rows", log, 60, env)
    assert first["status"] == "ok" and len(first["fallbacks"]) == 2
    assert "recompile_limit" in first["fallbacks"][0] and first["fallbacks"][1].endswith("running it eagerly")
    assert second["status"] == "ok" and "fallbacks" not in second
    assert run_all.fallback_lines("ROW {}\nall compiled\n") == []


def test_a_smoke_run_shares_a_process_only_between_plain_parts():
    """Consecutive ``--part`` jobs of one module share a smoke process; a job with its own flag (a profile, VAR's
    one-call attention) gets its own, so the flag does not reach (and rename) the other jobs' rows."""
    plan = run_all.smoke_plan(run_all.select("train-masked-L,train-ar-L,train-var-d16,train-var-d16-one-call,"
                                             "profile-train-var"))
    assert [j.name for j in plan] == ["train-masked-L+train-ar-L+train-var-d16", "train-var-d16-one-call",
                                      "profile-train-var"]
    assert plan[0].args == ["--part", "masked-L", "--part", "ar-L", "--part", "var-d16"]


def test_a_variants_rows_end_in_its_tag():
    from benchmarks.common import RowSink
    sink = RowSink(None, "train var-d16", smoke=True, tag=" [alone>=1024]")
    assert sink.add(name="var-d16 train compiled", median_s=1.0)["name"] == "var-d16 train compiled [alone>=1024]"
    assert sink.error("var-d16 train eager", RuntimeError("oom"))["name"] == "var-d16 train eager [alone>=1024]"
