import json
from pathlib import Path

from benchmarks import readme_table
from benchmarks.common import results_file
from benchmarks.peers import ratios

ROOT = Path(__file__).resolve().parents[2]


def sample_row(run, ips, batch=64, name="ar-B compiled autocast-weights"):
    return {"name": name, "bench": "sample", "model": "ar-B", "batch": batch, "decode": False, "run_id": run,
            "images_per_s": ips, "median_s": batch / ips, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
            "dtype": "bf16 autocast", "config": {"cfg_scale": 2.0, "top_k": 2000}, "compile": "step",
            "peak_mem_gb": 1.8}


def peer_row(run, ips, batch=64):
    return {"name": "peer LlamaGen GPT-B c2i compiled", "bench": "peer", "peer_key": "lg-B-compiled", "batch": batch,
            "run_id": run, "images_per_s": ips, "median_s": batch / ips}


def test_the_table_takes_each_rows_latest_run_and_its_latest_same_run_peer():
    older_var = {"name": "var-d16 train compiled b128", "bench": "train", "batch": 128, "run_id": "v",
                 "tokens_per_s": 260000.0, "mfu": 0.45}       # the same measurement under its other name, older
    rows = [older_var, sample_row("a", 300.0), peer_row("a", 150.0),    # paired: 2.00x
            sample_row("b", 320.0), peer_row("b", 200.0),               # paired: 1.60x, the latest pair
            sample_row("c", 330.0),                                     # the latest row: no peer in its run
            sample_row("b", 1 / 0.1, batch=1, name="ar-B compiled autocast-weights b1"), peer_row("b", 1 / 0.4, 1),
            {"name": "var-d16 train compiled [alone>=169]", "bench": "train", "batch": 128, "run_id": "d",
             "tokens_per_s": 279000.0, "mfu": 0.48, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
             "dtype": "bf16 autocast", "config": "configs/generator/var-d16.yaml", "compile": "wrapper",
             "model": "var-d16", "gap": 2.08},
            {"name": "var-d16 train data wait", "model": "var-d16", "batch": 128, "run_id": "w",
             "data_wait_fraction": 0.005}]
    lines = readme_table.table({"rows": rows, "ratios": ratios(rows)}).splitlines()
    assert lines[0].split(" | ")[1:4] == ["ours (latest run)", "/ anchor", "ours / peer (latest same run)"]
    ar, ar_b1, var = (line.split(" | ") for line in lines[2:])
    assert ar[:7] == ["| AR-B (111M), bf16 Linear weights", "330 img/s (c)", "1.95x of 169 img/s",
                      "1.60x: 320 vs 200 img/s (b)", ">= 1.5x LlamaGen GPT-B compiled", "-", "1.8 GB"]
    assert ar[7:11] == ["H100 80GB HBM3", "2.11.0", "bf16 autocast", "64"]
    # latency: ours / peer, lower is better (100 vs 400 ms), the issue's <= 0.5x; the anchor is 272 ms
    assert ar_b1[1:5] == ["100.0 ms (b)", "0.37x of 272 ms", "0.25x: 100.0 vs 400 ms (b)",
                          "<= 0.5x LlamaGen GPT-B compiled"]
    assert var[1:6] == ["279.0k tok/s, MFU 48.0% (d); data wait 0.5% (w)", "-", "-", "MFU >= 50%", "2.1"]
    assert len(lines) == 5                      # headline rows with no measurement are left out


def test_the_readme_holds_the_table_of_the_committed_results():
    """The README's performance table is the generator's output on the H100 results file (rerun
    ``python3 -m benchmarks.readme_table`` and paste it between the markers after merging a run)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- perf-table:start")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- perf-table:end -->")].strip()
    payload = json.loads(results_file(readme_table.README_DEVICE).read_text())
    assert block == readme_table.table(payload)
