"""Run the benchmark suite: each job in its own subprocess (a crash, an OOM or a hung compile loses
that job only), under a wall-clock budget; print one table and the ratios against the peers; write JSON.
The "quality" group (benchmarks/quality.py, benchmarks/inpainting.py) measures trained models: it needs
``--models DIR`` (checkpoints/train_all.sh's OUT), is not part of ``all``, and writes <slug>-quality.json.

    python3 -m benchmarks.run_all [--jobs call1|call2|all|NAME,...] [--budget-s 570] [--out F]
    python3 -m benchmarks.run_all --smoke              # CPU, tiny configs: proves every code path
    python3 -m benchmarks.run_all --merge A.json B.json  # one table + ratios from saved runs
    python3 -m benchmarks.run_all --jobs quality --models runs/demo   # quality of the trained demo models
    python3 -m benchmarks.run_all --list

A job is skipped when its estimated GPU seconds exceed what is left of ``--budget-s``, and is stopped
(its process group) when it runs past that; rows it finished are kept (each job appends its rows to a
JSON-lines file as it goes). Results: benchmarks/results/<device-slug>.json, and $OUT/bench.json +
$OUT/bench.log when $OUT is set. Ratios ours / peer pair rows of the same run only (run_id).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (default_emoji_cache, device_facts, device_slug, make_lpips_importable, print_table,
                               repo_root, results_file, write_json)
from benchmarks.peers import ratios


@dataclass
class Job:
    name: str
    module: str
    args: list[str]
    est_s: float             # GPU wall seconds, start-up and compiles included (NOTES.md: update after a run)
    smoke_args: list[str] = field(default_factory=list)
    needs_models: bool = False   # quality jobs: measure the trained models of --models DIR


EMOJI_SECONDS = int(os.environ.get("TESSERA_EMOJI_SECONDS", 90))   # tok-emoji's time limit
JOBS = [
    # call 1: sampling throughput + batch-1 latency, with the peers of the same run (every ratio)
    Job("peers", "benchmarks.peers", ["--batch", "64"], 75, ["--batch", "2"]),   # smoke: our smoke batch
    Job("sample-masked", "benchmarks.generators", ["--part", "sample-masked"], 240),
    Job("sample-ar", "benchmarks.generators", ["--part", "sample-ar"], 120),
    Job("sample-var", "benchmarks.generators", ["--part", "sample-var"], 400),   # 353 s on an H100 (session 28)
    Job("sample-ar-autotune", "benchmarks.generators", ["--part", "sample-ar-autotune"], 165),  # A28: autotuned step
    Job("sample-ar-pdl", "benchmarks.generators", ["--part", "sample-ar-pdl"], 120),  # A48: sample-ar's bf16 rows
    Job("sample-ar-split", "benchmarks.generators", ["--part", "sample-ar-split"], 90),    # A54: batch 1's attention
    Job("sample-ar-unfused-query", "benchmarks.generators", ["--part", "sample-ar-unfused-query"], 90),  # A56 off
    Job("sample-ar-fused-query", "benchmarks.generators", ["--part", "sample-ar-fused-query"], 90),   # A56 on
    Job("sample-ar-cublas", "benchmarks.generators", ["--part", "sample-ar-cublas"], 120),  # A52 off: the same
    Job("sample-ar-no-pdl", "benchmarks.generators", ["--part", "sample-ar-no-pdl"], 90),   # A57 off: the same
    Job("sample-masked-fused", "benchmarks.generators", ["--part", "sample-masked-fused"], 200),  # 145-201 s (s. 20)
    Job("sample-masked-torch-attn", "benchmarks.generators", ["--part", "sample-masked-torch-attn"], 90),  # A29 off
    Job("sample-masked-split-attn", "benchmarks.generators", ["--part", "sample-masked-split-attn"], 60),  # A36: 32 s
    Job("sample-masked-torch-draw", "benchmarks.generators", ["--part", "sample-masked-torch-draw"], 60),  # A32 off
    Job("sample-masked-cd", "benchmarks.generators", ["--part", "sample-masked-cd"], 190),  # 167 s (session 20)
    Job("sample-masked-cublaslt", "benchmarks.generators", ["--part", "sample-masked-cublaslt"], 90),  # a guess
    Job("sample-masked-autocast-weights", "benchmarks.generators", ["--part", "sample-masked-autocast-weights"],
        90),                                                      # the pipelines' bf16 Linear weights
    Job("sample-masked-unshared", "benchmarks.generators", ["--part", "sample-masked-unshared"], 60),  # A37 off: 33 s
    Job("sample-masked-no-call-graphs", "benchmarks.generators", ["--part", "sample-masked-no-call-graphs"],
        70),  # A39 off, + the ids on and off: 46-54 s (session 21)
    Job("sample-masked-max-autotune", "benchmarks.generators", ["--part", "sample-masked-max-autotune"],
        500),  # 489 s (session 22): inductor times matmul templates for every forward shape, then a default compile
    Job("sample-masked-inductor-default", "benchmarks.generators", ["--part", "sample-masked-inductor-default"],
        75),   # A43 off, + the ids: 56 s (session 23)
    Job("sample-masked-pdl", "benchmarks.generators", ["--part", "sample-masked-pdl"], 75),   # A44, + the ids: 55-60 s
    Job("sample-masked-cublas-workspace", "benchmarks.generators", ["--part", "sample-masked-cublas-workspace"],
        75),   # A45 off: 33-72 s (session 23)
    Job("sample-masked-stored-noise", "benchmarks.generators", ["--part", "sample-masked-stored-noise"],
        60),   # A46 off: 21-40 s (session 24)
    Job("sample-masked-host", "benchmarks.generators", ["--part", "sample-masked-host"],
        60),  # one compile and three recordings: 29 s (session 23)
    Job("profile-var", "benchmarks.generators", ["--part", "profile-var"], 220),   # A24: its warm-up compiles ~150 s
    Job("profile-ar", "benchmarks.generators", ["--part", "profile-ar"], 75),
    Job("profile-masked", "benchmarks.generators", ["--part", "profile-masked"], 150),
    Job("peers-b1", "benchmarks.peers", ["--batch", "1"], 80),      # last: the latency ratios are the extra
    # call 2: training MFU, the tokenizer (its decode ratio needs the VQ-16 decoder of the same run)
    # 84-111 s (session 24, H100) before the compiled step also ran at 2x (or 1.5x) the eager batch: 1-2 compiles more
    Job("train-masked-L", "benchmarks.gen_train", ["--part", "masked-L"], 200),
    Job("train-ar-L", "benchmarks.gen_train", ["--part", "ar-L"], 200),
    Job("train-var-d16", "benchmarks.gen_train", ["--part", "var-d16"], 260),   # + the codec inputs' compile
    Job("profile-train-ar", "benchmarks.gen_train", ["--part", "ar-L", "--profile"], 185),
    Job("profile-train-masked", "benchmarks.gen_train", ["--part", "masked-L", "--profile"], 190),
    Job("profile-train-var", "benchmarks.gen_train", ["--part", "var-d16", "--profile"], 310),   # 299 s (s. 26)
    # A53: VAR's teacher forcing as one masked SDPA call per layer, to pair with train-var-d16's rows
    Job("train-var-d16-one-call", "benchmarks.gen_train", ["--part", "var-d16", "--var-alone-tokens", "1024"], 290),
    # the compiled VAR step under three attention groupings (5 calls per layer, 3, 1) and the first again, one process
    Job("train-var-d16-groupings", "benchmarks.gen_train",
        ["--part", "var-d16", "--var-alone-sweep", "64,169,1024", "--batch", "128"], 280,
        smoke_args=["--part", "var-d16", "--var-alone-sweep", "64,1024"]),
    # the compiled VAR step with the fused adaLN and qk-norm + RoPE ops, and with inductor's kernels for each
    # (A61, A63), one process
    Job("train-var-d16-compile", "benchmarks.gen_train",
        ["--part", "var-d16", "--compile-sweep", "default,qk-torch,adaln-torch", "--batch", "128", "--profile"], 280,
        smoke_args=["--part", "var-d16", "--compile-sweep", "default,qk-torch,adaln-torch", "--profile"]),
    # masked-L and AR-L training with the qk-norm + RoPE op and with inductor's kernels (A63), at the batch that fills
    # the GPU for their compiled steps, one process
    Job("train-lm-compile", "benchmarks.gen_train",
        ["--part", "masked-L", "--part", "ar-L", "--compile-sweep", "default,qk-torch", "--batch", "256"], 240,
        smoke_args=["--part", "masked-L", "--part", "ar-L", "--compile-sweep", "default,qk-torch"]),
    # VAR-d16 training with grad clipping inside fused AdamW (the Trainer's, A65) and as its own pass, one process
    Job("train-clip", "benchmarks.gen_train",
        ["--part", "var-d16", "--compile-sweep", "default,clip-pass", "--batch", "128"], 200,
        smoke_args=["--part", "var-d16", "--compile-sweep", "default,clip-pass"]),
    # the qk-norm + RoPE op's backward as a kernel and as torch ops (A66): masked-L, then VAR-d16
    Job("train-qk-bwd", "benchmarks.gen_train",
        ["--part", "masked-L", "--compile-sweep", "default,qk-bwd-torch", "--batch", "256"], 170,
        smoke_args=["--part", "masked-L", "--compile-sweep", "default,qk-bwd-torch"]),
    Job("train-qk-bwd-var", "benchmarks.gen_train",
        ["--part", "var-d16", "--compile-sweep", "default,qk-bwd-torch", "--batch", "128"], 230,
        smoke_args=["--part", "var-d16", "--compile-sweep", "default,qk-bwd-torch"]),
    Job("peers-dec", "benchmarks.peers", ["--batch", "64", "--peer-jobs", "lg-B"], 50,
        ["--batch", "2", "--peer-jobs", "lg-B"]),
    Job("tok-decode", "benchmarks.tokenizer", ["--part", "decode"], 50),
    Job("tok-train", "benchmarks.tokenizer", ["--part", "train"], 140),  # + cudnn.benchmark (A51), compiled (A68)
    Job("maxbatch", "benchmarks.generators", ["--part", "maxbatch"], 75),
    Job("tok-encode", "benchmarks.tokenizer", ["--part", "encode"], 40),
    Job("tok-emoji", "benchmarks.tokenizer", ["--emoji-train", str(EMOJI_SECONDS)], EMOJI_SECONDS + 60,
        ["--emoji-train", "60"]),
    # quality of the trained demo models (--models DIR): not in "all"; AR's decode compile dominates est_s
    Job("quality", "benchmarks.quality", ["--num-samples", "1000"], 75, needs_models=True),
    Job("inpainting", "benchmarks.inpainting", ["--num-images", "180"], 40, needs_models=True),
]
CALLS = {"call1": ["peers", "sample-masked", "sample-ar", "sample-var", "peers-b1"],
         "call2": ["train-masked-L", "train-ar-L", "train-var-d16", "peers-dec", "tok-decode", "tok-train",
                   "maxbatch", "tok-encode", "tok-emoji"],
         "quality": ["quality", "inpainting"]}
# named explicitly, never in "all": a job that re-runs part of another, and the profiles (diagnostics)
EXPLICIT_ONLY = {"sample-masked-fused", "sample-masked-torch-attn", "sample-masked-split-attn",
                 "sample-masked-torch-draw", "sample-masked-cd", "sample-masked-cublaslt",
                 "sample-masked-autocast-weights", "sample-masked-unshared", "sample-masked-no-call-graphs",
                 "sample-masked-max-autotune", "sample-masked-inductor-default", "sample-masked-pdl",
                 "sample-masked-cublas-workspace", "sample-masked-stored-noise", "sample-masked-host",
                 "sample-ar-autotune", "sample-ar-pdl", "sample-ar-cublas", "sample-ar-no-pdl", "sample-ar-split",
                 "sample-ar-unfused-query", "sample-ar-fused-query",
                 "profile-masked", "profile-ar", "profile-var",
                 "profile-train-ar", "profile-train-masked", "profile-train-var", "train-var-d16-one-call",
                 "train-var-d16-groupings", "train-var-d16-compile", "train-lm-compile",
                 "train-clip", "train-qk-bwd", "train-qk-bwd-var"}
SMOKE_EST_S = 30             # budget accounting in smoke runs (CPU): per job
COLUMNS = ["job", "name", "device", "dtype", "batch", "compile", "median_s", "images_per_s", "tokens_per_s", "mfu",
           "compute_floor_s", "memory_floor_s", "gap", "peak_mem_gb", "note"]
RATIO_COLUMNS = ["ratio", "ours", "batch", "value", "target", "met", "same_run", "peer_source", "run_id"]
QUALITY_TABLES = {   # rows of the quality jobs (their own output has the full markdown tables)
    "quality": ["name", "steps", "params", "images_per_s", "fd", "precision", "recall", "class_acc", "bits_per_token",
                "error"],
    "quality-tokenizer": ["name", "params", "psnr", "ssim", "usage", "perplexity", "fd_recon", "error"],
    "inpainting": ["name", "steps", "mask", "psnr", "mae", "class_acc", "outside_identical", "error"],
    "quality-target": ["name", "text"]}


def select(spec: str | None) -> list[Job]:
    by_name = {j.name: j for j in JOBS}
    if not spec or spec == "all":
        return [j for j in JOBS if not j.needs_models and j.name not in EXPLICIT_ONLY]
    names: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        names += CALLS.get(item, [item])
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; jobs: {', '.join(by_name)}; groups: {', '.join(CALLS)}")
    return [by_name[n] for n in dict.fromkeys(names)]


def smoke_plan(jobs: list[Job]) -> list[Job]:
    """Smoke runs put consecutive ``--part`` jobs of one module into one process (the start-up of a
    process that imports torch dominates a CPU smoke run), where their arguments are parts only (a flag such as
    ``--profile`` would apply to every part of the process); GPU runs keep one process per job."""
    def parts_only(args: list[str]) -> bool:
        return len(args) % 2 == 0 and all(a == "--part" for a in args[::2])

    plan: list[Job] = []
    order = list(dict.fromkeys(j.module for j in jobs))
    for j in sorted(jobs, key=lambda j: order.index(j.module)):      # stable: each module's jobs together
        args = j.smoke_args or j.args
        prev = plan[-1] if plan else None
        if prev and prev.module == j.module and args and parts_only(args) and parts_only(prev.args):
            plan[-1] = Job(f"{prev.name}+{j.name}", j.module, prev.args + args, prev.est_s + SMOKE_EST_S)
        else:
            plan.append(Job(j.name, j.module, args, SMOKE_EST_S, needs_models=j.needs_models))
    return plan


# lines of a job's output that say a compiled path ran eagerly after all (session 24's masked batch-1 rows ran their
# update eagerly after dynamo's recompile limit, and no row said so: NOTES A50)
FALLBACK_MARKERS = ("hit config.recompile_limit", "running it eagerly", "decoding eagerly", "failed -> eager")


def fallback_lines(text: str, most: int = 5) -> list[str]:
    """The first ``most`` lines of ``text`` (a job's output) with a ``FALLBACK_MARKERS`` marker, stripped."""
    found = [line.strip() for line in text.splitlines() if any(m in line for m in FALLBACK_MARKERS)]
    return [line[:300] for line in found[:most]]


def run_job(job: Job, smoke: bool, rows_file: Path, log, timeout: float, env: dict, models: str | None = None) -> dict:
    """The job's module in a new process group; stopped (TERM, then KILL) at ``timeout``. The result lists the
    lines of its output that report a compile falling back to eager (``fallback_lines``)."""
    cmd = [sys.executable, "-m", job.module, *job.args, "--rows-out", str(rows_file)] + (["--smoke"] if smoke else [])
    if job.needs_models and models:
        cmd += ["--models", models]
    log.write(f"\n===== {job.name}: {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    t0 = time.perf_counter()
    env = dict(env, BENCH_DEADLINE=str(time.time() + timeout))     # jobs that run children stop them in time
    p = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status = "ok"
    try:
        rc = p.wait(timeout=max(timeout, 1))
        status = "ok" if rc == 0 else f"exit {rc}"
    except subprocess.TimeoutExpired:
        status = f"stopped at the budget ({timeout:.0f} s)"
        _stop_group(p)
        rc = p.returncode
    result = {"job": job.name, "status": status, "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    log.flush()
    with open(log.name, errors="replace") as out:
        out.seek(start)
        fallbacks = fallback_lines(out.read())
    return {**result, "fallbacks": fallbacks} if fallbacks else result


def _stop_group(p: subprocess.Popen) -> None:
    """SIGTERM to the job's own process group (it started it: start_new_session), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_rows(path: Path, run_id: str) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append({**json.loads(line), "run_id": run_id})
    return rows


def report(payload: dict) -> None:
    rats = payload["ratios"]
    quality = [r for r in payload["rows"] if r.get("bench") in QUALITY_TABLES]
    rows = [r for r in payload["rows"] if r.get("bench") not in QUALITY_TABLES]
    smoke = any(r.get("smoke") for r in payload["rows"])
    if smoke:
        print("\nSMOKE RUN (CPU, tiny configs): no numbers below are measurements; floors are the H100's for the tiny sizes")
    print()
    if rows:     # the table shows the first 80 characters of a note or an error; the JSON has all
        print_table([{**r, "note": _note(r)} for r in rows], COLUMNS)
    if rats:
        print("\nratios (ours / peer; latency: peer / ours) - same_run False = against the recorded anchor, not a measurement")
        print_table(rats, RATIO_COLUMNS)
    for bench, columns in QUALITY_TABLES.items():
        sel = [r for r in quality if r["bench"] == bench]
        if sel:
            print(f"\n{bench} (feature space and settings: the job's output in the log and its JSON)")
            print_table([{**r, "error": r.get("error") and r["error"][:80]} for r in sel], columns)
    jobs = payload.get("jobs", [])
    if jobs:
        print("\njobs: " + "; ".join(f"{j['job']} {j['status']} {j.get('wall_s', 0):.0f}s" for j in jobs))
    for j in jobs:
        for line in j.get("fallbacks", []):
            print(f"COMPILE FALLBACK in {j['job']}: {line}")
    skipped = [j["job"] for j in jobs if j["status"].startswith("skipped")]
    if skipped:
        print("skipped (run next with --jobs " + ",".join(skipped) + ")")


def _note(row: dict) -> str | None:
    text = f"ERROR {row['error']}" if row.get("error") else row.get("note") or ""
    return text[:80] or None


def write_outputs(payload: dict, out: str | None, smoke: bool) -> list[str]:
    paths = []
    if out:
        paths.append(out)
    if os.environ.get("OUT"):
        paths.append(str(Path(os.environ["OUT"]) / "bench.json"))
    results = None
    if not smoke:     # a quality-only run gets its own file: it must not replace the speed results
        quality_only = payload["rows"] and all(r.get("bench") in QUALITY_TABLES for r in payload["rows"])
        results = results_file(f"{payload['slug']}{'-quality' if quality_only else ''}")
    elif not out:
        paths.append("/tmp/tessera-bench/smoke.json")      # smoke numbers are never results
    for p in dict.fromkeys(paths):
        write_json(p, payload)
    if results is not None:
        write_json(str(results), accumulate(results, payload))
        paths.append(str(results))
    return paths


def accumulate(path: Path, payload: dict) -> dict:
    """The device's results file keeps every run: the rows and jobs of the runs in ``payload`` replace
    only their own earlier versions (a run rewrites the file after each job), and the ratios are paired
    over all rows (each within its own run)."""
    if not path.is_file():
        return payload
    old = json.loads(path.read_text())
    runs = {r.get("run_id") for r in payload["rows"]} | {payload.get("run_id")}
    runs.discard(None)
    rows = [r for r in old.get("rows", []) if r.get("run_id") not in runs] + payload["rows"]
    jobs = [j for j in old.get("jobs", []) if j.get("run_id") not in runs] + payload.get("jobs", [])
    merged_from = old.get("merged_from") or ([old["run_id"]] if old.get("run_id") else [])
    merged_from = [m for m in merged_from if m not in runs] + sorted(runs)
    return {**payload, "merged_from": merged_from, "jobs": jobs, "rows": rows, "ratios": ratios(rows)}


def merge(files: list[str]) -> None:
    payloads = [json.loads(Path(f).read_text()) for f in files]
    rows = [r for p in payloads for r in p["rows"]]
    merged = {"merged_from": files, "slug": payloads[0].get("slug", "merged"), "facts": payloads[0].get("facts"),
              "jobs": [j for p in payloads for j in p.get("jobs", [])], "rows": rows, "ratios": ratios(rows)}
    report(merged)
    smoke = any(r.get("smoke") for r in rows)
    print("\nwrote " + ", ".join(write_outputs(merged, None, smoke)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", help="comma-separated job names or groups (call1, call2, all); default: all")
    ap.add_argument("--budget-s", type=float, default=570.0,
                    help="wall-clock cap: skip jobs whose estimate does not fit, stop a job at it (default 570)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--smoke", action="store_true", help="every job on the CPU with tiny configs (no numbers)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine saved runs into one table and ratios")
    ap.add_argument("--list", action="store_true", help="list the jobs, their estimates and groups")
    ap.add_argument("--models", help="the quality jobs' trained models: checkpoints/train_all.sh's OUT, e.g. runs/demo")
    a = ap.parse_args()
    if a.merge:
        return merge(a.merge)
    jobs = select(a.jobs)
    if not a.list and not a.smoke and not a.models and any(j.needs_models for j in jobs):
        raise SystemExit("the quality jobs measure trained models: give --models DIR (checkpoints/train_all.sh's OUT)")
    if a.models:
        if not Path(a.models).is_dir():
            raise SystemExit(f"--models {a.models}: no such directory")
        a.models = str(Path(a.models).resolve())      # the jobs run in the repository root
    if a.list:
        for j in JOBS:
            group = next((g for g, names in CALLS.items() if j.name in names), "-")
            print(f"{j.name:16s} {group:6s} ~{j.est_s:4.0f} s  python3 -m {j.module} {' '.join(j.args)}")
        return

    t_start, run_id = time.perf_counter(), uuid.uuid4().hex[:12]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lpips_site = make_lpips_importable()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root()), lpips_site, os.environ.get("PYTHONPATH")) if p)
    default_emoji_cache(env)
    if a.smoke:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    work = Path(os.environ.get("OUT") or "/tmp/tessera-bench")
    work.mkdir(parents=True, exist_ok=True)
    rows_file = Path(f"/tmp/tessera-bench-rows-{run_id}.jsonl")
    log_path = work / ("smoke.log" if a.smoke else "bench.log")
    facts = device_facts()
    payload = {"run_id": run_id, "slug": "cpu-smoke" if a.smoke else device_slug(), "facts": facts,
               "argv": sys.argv[1:], "smoke": a.smoke, "budget_s": a.budget_s, "jobs": [], "rows": [], "ratios": []}
    print(f"run {run_id} on {facts['device']}, torch {facts['torch']}; jobs: {', '.join(j.name for j in jobs)}; "
          f"log: {log_path}", flush=True)
    with open(log_path, "a") as log:
        for job in smoke_plan(jobs) if a.smoke else jobs:
            left = a.budget_s - (time.perf_counter() - t_start)
            est = job.est_s
            if est > left:
                payload["jobs"].append({"job": job.name, "status": f"skipped (needs ~{est:.0f} s, {left:.0f} s left)"})
                print(f"  {job.name}: skipped (~{est:.0f} s > {left:.0f} s left)", flush=True)
                continue
            res = run_job(job, a.smoke, rows_file, log, left - 5, env, a.models)
            payload["jobs"].append({**res, "run_id": run_id})
            payload["rows"] = read_rows(rows_file, run_id)
            payload["ratios"] = ratios(payload["rows"])
            payload["wall_s"] = round(time.perf_counter() - t_start, 1)
            write_outputs(payload, a.out, a.smoke)       # after every job: a killed run still leaves its results
            print(f"  {job.name}: {res['status']} in {res['wall_s']:.0f} s"
                  + (f"; {len(res['fallbacks'])} compile fallback line(s), see the report" if res.get("fallbacks")
                     else ""), flush=True)
    report(payload)
    print(f"\n{payload.get('wall_s', 0):.0f} s; wrote " + ", ".join(write_outputs(payload, a.out, a.smoke)))
    rows_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
