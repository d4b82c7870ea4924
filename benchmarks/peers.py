"""The peers in the same run, and every ratio ours / peer.

    python3 -m benchmarks.peers [--batch 64] [--peer-jobs lg-B-compiled,var-d16] [--rows-out F] [--smoke]

Runs the peers' own sampling code through peers/bench_peers.py (LlamaGen GPT-B c2i and its VQ-16
decoder, VAR-d16 incl. decoding; random weights, bf16; git-ignored, never committed), one process
per peer job, and turns its JSON into rows. ``ratios(rows)`` (called by run_all) pairs our rows with
peer rows of the same run only; where a run has no peer row it falls back to the recorded anchor
and says so (``peer_source``), because a ratio across runs is not a measurement.

Smoke runs (CPU) cannot run the peers: they feed the recorded anchors through the same parser.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RowSink, job_args, repo_root, seconds_left

# the peers on nvidia-h100-x1, torch 2.11, batch 64 (peers/bench_peers.py docstring, 2026-11-23)
ANCHOR_DATE = "2026-11-23 (H100, torch 2.11, batch 64)"
ANCHORS = {"lg-B-compiled": 169.3, "lg-B": 13.1, "lg-L-compiled": 86.5, "var-d16": 125.4, "var-d20": 92.4,
           "vq16-decode": 388.0}
# batch-1 latency of the same peers, seconds per image incl. CFG (issue 11: LlamaGen GPT-B compiled, VAR-d16 incl. decoding)
ANCHORS_B1_S = {"lg-B-compiled": 0.272, "var-d16": 0.137}
DEFAULT_JOBS = "lg-B-compiled,var-d16"

# (ratio name, our row selector, peer key, target): images/s ratios at batch 64, latency ratios at batch 1
TARGETS = [
    ("masked@16 / LlamaGen GPT-B compiled", dict(model="masked-B", steps=16, decode=False), "lg-B-compiled", 1.5),
    ("masked@8 / LlamaGen GPT-B compiled", dict(model="masked-B", steps=8, decode=False), "lg-B-compiled", 3.0),
    ("AR-B / LlamaGen GPT-B compiled", dict(model="ar-B", decode=False), "lg-B-compiled", 1.5),
    ("VAR-d16 / VAR-d16 (incl. decode)", dict(model="var-d16", decode=True), "var-d16", 1.3),
    ("f16 decode / LlamaGen VQ-16 decoder", dict(bench="decode"), "vq16-decode", 1.5),
]
# latency value = peer latency / ours (higher is better); issue 11's "ours <= f x peer's" is a target of 1 / f
LATENCY_TARGETS = [
    ("masked@16 b1 latency vs LlamaGen GPT-B compiled b1", dict(model="masked-B", steps=16, decode=False), "lg-B-compiled",
     1 / 0.25),
    ("AR-B b1 latency vs LlamaGen GPT-B compiled b1", dict(model="ar-B", decode=False), "lg-B-compiled", 1 / 0.5),
    ("VAR-d16 b1 latency vs VAR-d16 b1 (incl. decode)", dict(model="var-d16", decode=True), "var-d16", 1 / 0.7),
]


def run_bench_peers(batch: int, jobs: str, out: Path, timeout: float | None) -> dict | None:
    """peers/bench_peers.py --out OUT --jobs JOBS --batch B; its JSON (written after every peer job,
    so a run cut short by ``timeout`` still returns what finished). None when peers/ is missing."""
    script = repo_root() / "peers" / "bench_peers.py"
    if not script.is_file():
        return None
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--out", str(out), "--jobs", jobs, "--batch", str(batch)]
    # Without our root on the path: our regular package ``tokenizer`` would win over LlamaGen's
    # namespace package of the same name (``tokenizer.tokenizer_image``), wherever each sits on sys.path.
    root = repo_root().resolve()
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != root]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    try:
        p = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=timeout)
        print(p.stdout[-4000:], p.stderr[-4000:], sep="\n")
    except subprocess.TimeoutExpired as e:
        print(f"bench_peers.py stopped after {timeout:.0f} s: {e}")
    return json.loads(out.read_text()) if out.is_file() else {"results": [], "error": "bench_peers wrote no JSON"}


def anchor_result(batch: int, jobs: str) -> dict:
    """What bench_peers.py would print, from the recorded anchors (smoke runs only)."""
    results = []
    for job in jobs.split(","):
        if job.startswith("lg-"):
            results.append({"peer": f"LlamaGen GPT-{job.split('-')[1]} c2i", "batch": batch,
                            "compile": job.endswith("compiled"), "gen_s": batch / ANCHORS[job],
                            "gen_img_per_s": ANCHORS[job], "vq16_decode_img_per_s_bf16": ANCHORS["vq16-decode"]})
        else:
            results.append({"peer": f"VAR-d{job[5:]}", "batch": batch, "gen_plus_decode_s": batch / ANCHORS[job],
                            "img_per_s": ANCHORS[job]})
    return {"device": "anchors", "results": results}


def add_peer_rows(result: dict, sink: RowSink, source: str) -> None:
    """bench_peers.py JSON -> rows keyed by ``peer_key`` (lg-B-compiled, lg-B, var-d16, vq16-decode, ...)."""
    for r in result.get("results", []):
        if "error" in r:
            sink.add(name=f"peer {r.get('job')}", bench="peer", peer_key=r.get("job"), error=r["error"][-300:])
            continue
        batch = r["batch"]
        if "gen_img_per_s" in r:
            size = r["peer"].split("GPT-")[1].split()[0]
            key = f"lg-{size}" + ("-compiled" if r.get("compile") else "")
            sink.add(name=f"peer {r['peer']}" + (" compiled" if r.get("compile") else ""), bench="peer",
                     peer_key=key, batch=batch, compile="reduce-overhead fullgraph" if r.get("compile") else "eager",
                     median_s=r["gen_s"], images_per_s=batch / r["gen_s"], params_M=r.get("params_M"),
                     config={"cfg": r.get("cfg", 2.0), "top_k": 2000}, peer_source=source)
            if r.get("vq16_decode_img_per_s_bf16"):
                ips = r["vq16_decode_img_per_s_bf16"]
                sink.add(name="peer LlamaGen VQ-16 decoder", bench="peer", peer_key="vq16-decode", batch=batch,
                         compile="eager", median_s=batch / ips, images_per_s=ips, peer_source=source)
        elif "img_per_s" in r:
            key = r["peer"].lower()
            sink.add(name=f"peer {r['peer']} (incl. decode)", bench="peer", peer_key=key, batch=batch,
                     compile="eager", median_s=r["gen_plus_decode_s"], images_per_s=batch / r["gen_plus_decode_s"],
                     params_M=r.get("params_M"), config={"cfg": r.get("cfg", 1.5), "top_k": 900, "top_p": 0.96},
                     peer_source=source)


def _matches(row: dict, sel: dict) -> bool:
    return not row.get("error") and all(row.get(k) == v for k, v in sel.items())


def ratios(rows: list[dict]) -> list[dict]:
    """Ours / peer for every (our row, target) pair: images/s ratios at the peer's batch (higher is
    better) and batch-1 latency ratios peer / ours (higher is better). A peer row is used only from
    the same run (``run_id``); otherwise the anchor, marked ``same_run: False`` with ``met: None``: a ratio
    across runs (and, for the H100 anchors, across devices) is not a measurement of the target."""
    out = []
    peers = [r for r in rows if r.get("bench") == "peer" and not r.get("error")]
    ours = [r for r in rows if r.get("bench") in ("sample", "decode") and r.get("images_per_s")]

    def peer_for(key, batch, run_id):
        same = [p for p in peers if p.get("peer_key") == key and p.get("batch") == batch and p.get("run_id") == run_id]
        if same:
            return same[-1]["images_per_s"], same[-1].get("peer_source", "same run"), True
        if batch == 64 and key in ANCHORS:
            return ANCHORS[key], f"anchor {ANCHOR_DATE}", False
        if batch == 1 and key in ANCHORS_B1_S:
            return 1 / ANCHORS_B1_S[key], "anchor (issue 11, H100, torch 2.11, batch 1)", False
        return None, None, False

    for name, sel, key, target in TARGETS:
        for r in (r for r in ours if _matches(r, sel) and r.get("batch") != 1):
            ips, source, same = peer_for(key, r["batch"], r.get("run_id"))
            if ips is None:
                continue
            ratio = r["images_per_s"] / ips
            out.append({"ratio": name, "ours": r["name"], "ours_compile": r.get("compile"), "batch": r["batch"],
                        "ours_images_per_s": r["images_per_s"], "peer_images_per_s": ips, "value": ratio,
                        "target": target, "met": ratio >= target if same else None, "same_run": same,
                        "peer_source": source, "run_id": r.get("run_id"), "device": r.get("device"),
                        "smoke": r.get("smoke", False)})
    for name, sel, key, target in LATENCY_TARGETS:
        for r in (r for r in ours if _matches(r, sel) and r.get("batch") == 1):
            ips, source, same = peer_for(key, 1, r.get("run_id"))
            if ips is None:
                continue
            out.append({"ratio": name, "ours": r["name"], "ours_compile": r.get("compile"), "batch": 1,
                        "ours_latency_s": r["median_s"], "peer_latency_s": 1 / ips, "value": (1 / ips) / r["median_s"],
                        "target": target, "met": (1 / ips) / r["median_s"] >= target if same else None,
                        "same_run": same, "peer_source": source, "run_id": r.get("run_id"), "device": r.get("device"),
                        "smoke": r.get("smoke", False)})
    return out


def main() -> None:
    def extra(p):
        p.add_argument("--peer-jobs", default=DEFAULT_JOBS, help="bench_peers.py jobs (comma-separated)")
        p.add_argument("--timeout", type=float, default=None, help="seconds before bench_peers.py is stopped")
    args = job_args(__doc__.splitlines()[0], ["peers"], extra)
    sink = RowSink(args.rows_out, f"peers b{args.batch}", args.smoke)
    t0 = time.perf_counter()
    if args.smoke:
        add_peer_rows(anchor_result(args.batch, args.peer_jobs), sink, "smoke: recorded anchors, not a run")
        return
    timeout = args.timeout or seconds_left(margin=10)      # stop the peers in time to keep what finished
    result = run_bench_peers(args.batch, args.peer_jobs, Path(f"/tmp/tessera-bench-peers-b{args.batch}.json"),
                             timeout)
    if result is None:
        sink.add(name="peers", bench="peer", error="peers/bench_peers.py not found (carry peers/)")
        return
    add_peer_rows(result, sink, "same run")
    print(f"peers done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
