"""The README's performance table, made from a device's results file (``run_all`` accumulates every run there).

    python3 -m benchmarks.readme_table [RESULTS.json | --this-device]   # prints the markdown

Default: the H100 file the README quotes; ``--this-device``: this machine's (``make bench`` prints it after a run).

One row per headline benchmark (``HEADLINES``): its latest measurement (the last row of that name and batch in
the file) and that against the peer's number recorded in issue 11 (the anchor: another day's run, so a guide,
not a measurement of the target), ours / peer from the latest run that timed the peer too (``peers.ratios``'
same-run pairs), the issue's target, peak GPU memory, and device, torch, dtype, batch, config and compile mode
of the latest row. Training rows give tokens/s, MFU (the target) and the step's data-wait fraction (the job's
latest at that batch). "x floor" is the row's ``gap``: the time over the larger roofline floor (NOTES.md).
The README holds the output between its ``perf-table`` markers; tests/benchmarks/test_readme_table.py checks
that it matches the committed results file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import device_slug, results_file
from benchmarks.peers import ratios

README_DEVICE = "nvidia-h100-80gb-hbm3"      # the results file the README quotes
MFU_TARGET = 0.5
HEADLINES = [   # (row name, or names of the same measurement: the latest of them; batch; what the table calls it)
    ("masked-B @16 fused-compiled", 64, "masked-B (111M), 16 steps"),
    ("masked-B @8 fused-compiled", 64, "masked-B, 8 steps"),
    ("masked-B @16 fused-compiled b1", 1, "masked-B, 16 steps, one image"),
    ("ar-B compiled autocast-weights", 64, "AR-B (111M), bf16 Linear weights"),
    ("ar-B compiled autocast-weights b1", 1, "AR-B, one image"),
    ("var-d16 compiled +decode", 64, "VAR-d16 (310M), incl. decoding"),
    ("var-d16 compiled b1 +decode", 1, "VAR-d16, one image, incl. decoding"),
    ("f16 decode channels_last compiled", 64, "f16 VQ-GAN decode, 256 px"),
    ("f16 encode channels_last compiled", 64, "f16 VQ-GAN encode, 256 px"),
    # what imagenet-f16.yaml trains with (train.compile: conv stacks and LPIPS compiled, NHWC; A68)
    ("f16 train step (GAN on) [compiled]", 32, "f16 VQ-GAN training step (+ PatchGAN, LPIPS)"),
    ("masked-L train compiled b256", 256, "masked-L (338M) training, 256 tokens"),
    ("ar-L train compiled b256", 256, "AR-L (338M) training, 256 tokens"),
    # the grouping sweep's default, the compile sweep's default (the shipped code), and the job's row when its eager
    # step fits 128 itself
    (("var-d16 train compiled b128", "var-d16 train compiled [alone>=169]", "var-d16 train compiled [default]",
      "var-d16 train compiled"), 128,
     "VAR-d16 (310M) training, 680 tokens"),
]
COLUMNS = ["what", "ours (latest run)", "/ anchor", "ours / peer (latest same run)", "target", "x floor",
           "peak memory", "device", "torch", "dtype", "batch", "config", "compile"]


def latest_rows(rows: list[dict]) -> dict[tuple[str, int], tuple[int, dict]]:
    """The last row of each (name, batch) and its place in the file: runs are appended in the order they ran."""
    out = {}
    for i, r in enumerate(rows):
        if not r.get("error") and not r.get("smoke"):
            out[(r["name"], r.get("batch"))] = (i, r)
    return out


def result(r: dict, latest: dict) -> str:
    """The row's number and run id; a training row's data-wait fraction too (the latest at its batch)."""
    if r.get("tokens_per_s"):
        text = f"{r['tokens_per_s'] / 1e3:.1f}k tok/s, MFU {100 * r['mfu']:.1f}% ({r['run_id']})"
        wait = latest.get((f"{r['model']} train data wait", r["batch"]))     # the data loader's share of a step
        if wait is not None and wait[1].get("data_wait_fraction") is not None:
            text += f"; data wait {100 * wait[1]['data_wait_fraction']:.1f}% ({wait[1]['run_id']})"
        return text
    if r.get("batch") == 1:
        return f"{1e3 * r['median_s']:.1f} ms ({r['run_id']})"
    return f"{r['images_per_s']:.0f} img/s ({r['run_id']})"


def ours_over_peer(ratio: dict) -> tuple[float, str, str]:
    """A ``peers.ratios`` entry as (ours / peer, our number, the peer's): latency too as ours / peer (lower is
    better), where the entry keeps peer / ours."""
    if "ours_latency_s" in ratio:
        ours, peer = ratio["ours_latency_s"], ratio["peer_latency_s"]
        return ours / peer, f"{1e3 * ours:.1f}", f"{1e3 * peer:.0f} ms"
    return ratio["value"], f"{ratio['ours_images_per_s']:.0f}", f"{ratio['peer_images_per_s']:.0f} img/s"


def against_anchor(r: dict) -> str:
    """The latest row against the issue's recorded peer number (``peers.ratios`` with no peer rows: the anchors)."""
    q = next((q for q in ratios([r]) if q["ours"] == r["name"]), None)
    if q is None:
        return "-"
    value, _, peer = ours_over_peer(q)
    return f"{value:.2f}x of {peer}"


def paired(ratio: dict) -> str:
    value, ours, peer = ours_over_peer(ratio)
    return f"{value:.2f}x: {ours} vs {peer} ({ratio['run_id']})"


def target(r: dict, ratio: dict | None) -> str:
    if r.get("tokens_per_s"):
        return f"MFU >= {100 * MFU_TARGET:.0f}%"
    if ratio is None:
        return "-"
    if "ours_latency_s" in ratio:
        return f"<= {1 / ratio['target']:.2g}x {peer_name(ratio)}"
    return f">= {ratio['target']:.2g}x {peer_name(ratio)}"


def peer_name(ratio: dict) -> str:
    """The peer a ratio compares with, from its name ('AR-B / LlamaGen GPT-B compiled', '... vs VAR-d16 b1 ...')."""
    name = ratio["ratio"].split(" vs ")[-1] if " vs " in ratio["ratio"] else ratio["ratio"].split(" / ")[-1]
    return name.replace(" b1", "")


def config(r: dict) -> str:
    c = r.get("config")
    if isinstance(c, dict):
        return ", ".join(f"{k} {v}" for k, v in c.items()) + (f", {r['steps']} steps" if r.get("steps") else "")
    return str(c or "-")


def table(payload: dict) -> str:
    latest = latest_rows(payload["rows"])
    same_run = {}
    for q in payload.get("ratios", []):
        if q.get("same_run") and not q.get("smoke"):
            same_run[(q["ours"], q["batch"])] = q          # the last same-run pairing of each row
    any_ratio = {(q["ours"], q["batch"]): q for q in payload.get("ratios", [])}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for names, batch, what in HEADLINES:
        found = [latest[(n, batch)] for n in ((names,) if isinstance(names, str) else names) if (n, batch) in latest]
        if not found:
            continue
        r = max(found, key=lambda place_row: place_row[0])[1]
        name = r["name"]
        q = same_run.get((name, batch))
        memory = f"{r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") else "-"
        floor = f"{r['gap']:.1f}" if r.get("gap") else "-"
        cells = [what, result(r, latest), against_anchor(r), paired(q) if q else "-",
                 target(r, q or any_ratio.get((name, batch))), floor, memory,
                 r.get("device", "-").replace("NVIDIA ", ""), r.get("torch", "-"), r.get("dtype", "-"), str(batch),
                 config(r), r.get("compile") or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    arg = sys.argv[1] if len(sys.argv) > 1 else None
    if arg == "--this-device":
        path = results_file(device_slug())
    else:
        path = Path(arg) if arg else results_file(README_DEVICE)
    if not path.is_file():
        sys.exit(f"no results file {path}: run python3 -m benchmarks.run_all on this device first")
    print(table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
