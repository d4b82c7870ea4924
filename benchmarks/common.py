"""Benchmark plumbing: device facts, synchronised timing, roofline floors, result rows, a printed
table, JSON; plus the helpers every job shares (guarded compile, OOM-safe batch search).

Every row records device, torch version, dtype, batch and config, so numbers are never quoted
without what produced them. Ratios against peers are only taken between rows of the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Callable

import torch

# METHOD.md's two numbers, bf16 dense matmul peak and device-to-device copy bandwidth (bytes read + written):
# the H100's measured here; the H200's not measured by tessera but taken from the device tool's KINDS.md
# (an 8192^3 bf16 product at 769-798 TFLOP/s on random data, copies at ~4.3 TB/s on its H200s)
PEAK_BF16_FLOPS = {"H100": 798e12, "H200": 790e12}
PEAK_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}
H100 = "H100"   # smoke rows compute their floors on the H100's numbers (marked smoke: nothing is measured)
log = logging.getLogger("bench")


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                     memory_gb=round(p.total_memory / 2**30, 1))
    else:
        facts.update(device=f"cpu ({torch.get_num_threads()} threads)")
    return facts


def device_slug() -> str:
    """'nvidia-h100-80gb-hbm3' (results/<slug>.json); 'cpu' without CUDA."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)


def floors(flops: float, bytes_moved: float, chip: str | None = None, impl_bytes: float | None = None) -> dict:
    """METHOD.md's two numbers: compute floor and memory floor (seconds); the larger bounds speed.

    ``chip`` ("H100"/"H200") uses that chip's numbers instead of this device's (smoke runs);
    ``impl_bytes`` (what the current code is predicted to move) adds ``impl_memory_s``."""
    pf, pb = (PEAK_BF16_FLOPS[chip], PEAK_BYTES_PER_S[chip]) if chip else (peak_flops(), peak_bandwidth())
    out = {"flops": flops, "bytes": bytes_moved}
    if impl_bytes is not None:
        out["impl_bytes"] = impl_bytes
    if pf and pb:
        out.update(compute_floor_s=flops / pf, memory_floor_s=bytes_moved / pb,
                   floor_s=max(flops / pf, bytes_moved / pb),
                   bound="compute" if flops / pf >= bytes_moved / pb else "memory")
        if impl_bytes is not None:
            out["impl_memory_s"] = impl_bytes / pb
        if chip:
            out["floor_chip"] = chip
    return out


def time_fn(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> dict:
    """Median wall time of ``fn`` (synchronised), after warm-up; also min and spread."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": iters}


def timing(smoke: bool, slow: bool = False) -> dict:
    """time_fn arguments: one untimed + one timed call in smoke runs; fewer repeats for slow calls.
    Two warm-up calls: the first compiles (a new shape recompiles), the second records CUDA graphs."""
    if smoke:
        return {"warmup": 1, "iters": 1}
    return {"warmup": 2, "iters": 3} if slow else {"warmup": 2, "iters": 5}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def capacity_bytes() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


# ---- result rows ----------------------------------------------------------------------------------
TABLE_KEYS = ("name", "batch", "compile", "median_s", "images_per_s", "tokens_per_s", "mfu", "compute_floor_s",
              "memory_floor_s", "gap", "peak_mem_gb", "error", "note")


class RowSink:
    """Appends one JSON line per result row to ``path`` (flushed at once, so a job killed by its
    time limit or an OOM still leaves every row it finished). Adds device facts and the smoke flag;
    gap = measured median / max(compute floor, memory floor). ``tag`` ends every row's name (a variant's rows, to
    pair with the default's of the same run)."""

    def __init__(self, path: str | Path | None, job: str, smoke: bool, tag: str = ""):
        self.path, self.job, self.smoke, self.tag = Path(path) if path else None, job, smoke, tag
        facts = device_facts()
        self.facts = {"device": facts["device"], "torch": facts["torch"]}
        self.rows: list[dict] = []

    def add(self, **row) -> dict:
        row = {"job": self.job, **self.facts, **row, "smoke": self.smoke}
        if self.tag and "name" in row:
            row["name"] += self.tag
        if row.get("floor_s") and row.get("median_s"):
            row["gap"] = row["median_s"] / row["floor_s"]
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        print("ROW " + json.dumps({k: row[k] for k in TABLE_KEYS if k in row}, default=str), flush=True)
        return row

    def error(self, name: str, exc: BaseException, **row) -> dict:
        """A row for a failed measurement: the table shows the error instead of numbers."""
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log.warning("%s failed: %s\n%s", name, msg, traceback.format_exc(limit=8))
        return self.add(name=name, error=msg, **row)


# ---- what the job modules share -------------------------------------------------------------------
def job_args(description: str, parts: list[str], extra: Callable[[argparse.ArgumentParser], None] | None = None,
             compile_mode: str = "default") -> argparse.Namespace:
    """The command line every job module takes: --part (repeatable), --smoke, --rows-out, --batch,
    --compile-mode (default ``compile_mode``); ``extra`` adds a module's own flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--part", choices=parts, action="append", help="what to run (repeatable; default: all)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny configs: proves the code paths, no numbers")
    p.add_argument("--rows-out", help="append result rows here as JSON lines")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile-mode", default=compile_mode,
                   help=f"torch.compile mode of the compiled variants; 'none' skips them (default {compile_mode})")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.part = args.part or parts
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args.smoke:
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return args


def profile_ops(run: Callable[[], object], on_gpu: bool, top: int = 15, trace: str | None = None) -> dict:
    """torch.profiler over one ``run()`` (warm it up first): prints the operators that take the most
    (GPU, else CPU) self time and returns the row fields: wall ``median_s``, ``gpu_busy_s`` (the summed
    self time: a launch-bound loop shows a low busy fraction), ``top_ops`` and, on a GPU, ``timeline``
    (``gpu_timeline``: where the GPU sat idle). Kernels replayed inside CUDA graphs are listed as the
    profiler reports them. ``trace``: a file name for a Chrome trace, written under $TESSERA_TRACE_DIR when
    that is set."""
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        with record_function("profiled run"):
            run()
            sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = "device_time_total" if on_gpu else "cpu_time_total"
    self_total = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    busy = sum(getattr(e, self_total) for e in events) / 1e6
    print(events.table(sort_by=self_total, row_limit=top, max_name_column_width=60))
    ranked = sorted(events, key=lambda e: getattr(e, self_total), reverse=True)[:top]
    fields = dict(median_s=wall, gpu_busy_s=busy, gpu_busy_fraction=busy / wall,
                  top_ops=[{"op": e.key[:80], "calls": e.count, "self_ms": round(getattr(e, self_total) / 1e3, 3),
                            "total_ms": round(getattr(e, total) / 1e3, 3)} for e in ranked])
    if on_gpu:
        fields["timeline"] = gpu_timeline(prof.events())
        print(json.dumps(fields["timeline"], indent=1))
    if trace and os.environ.get("TESSERA_TRACE_DIR"):
        Path(os.environ["TESSERA_TRACE_DIR"]).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(os.environ["TESSERA_TRACE_DIR"]) / trace))
    return fields


GAP_BUCKETS_US = (2, 10, 100, 1000)


def gpu_timeline(events, top: int = 12) -> dict:
    """Where the GPU sat idle during a profiled run: the kernels' intervals (profiler events on the
    device) merged, against the span from the run's start (its ``profiled run`` range on the CPU) to
    the last kernel's end. Returns milliseconds: ``span``, ``busy`` (the union of kernel intervals),
    ``lead`` (start of the run to its first kernel), ``idle`` by gap size (upper bounds in us), and the
    ``top`` longest gaps with the kernels on either side."""
    from torch.autograd import DeviceType
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events
                      if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
                      and not getattr(e, "is_user_annotation", False) and e.name != "profiled run"),
                     key=lambda k: k[0])     # kernels, copies, memsets: not the run's own range on the GPU
    starts = [e.time_range.start for e in events if e.name == "profiled run" and e.device_type == DeviceType.CPU]
    if not kernels:
        return {}
    run_start = starts[0] if starts else kernels[0][0]
    busy, gaps, end, before = 0.0, [], kernels[0][0], None
    for start, stop, name in kernels:
        if start > end and before is not None:
            gaps.append((start - end, before, name))
        if stop > end:
            busy += stop - max(start, end)
            end, before = stop, name
    buckets = {f"<{b}us": 0.0 for b in GAP_BUCKETS_US} | {f">={GAP_BUCKETS_US[-1]}us": 0.0}
    counts = dict.fromkeys(buckets, 0)
    for g, _, _ in gaps:
        key = next((f"<{b}us" for b in GAP_BUCKETS_US if g < b), f">={GAP_BUCKETS_US[-1]}us")
        buckets[key] += g / 1e3
        counts[key] += 1
    return dict(span_ms=round((end - run_start) / 1e3, 3), busy_ms=round(busy / 1e3, 3),
                lead_ms=round((kernels[0][0] - run_start) / 1e3, 3), kernels=len(kernels),
                idle_ms={k: round(v, 3) for k, v in buckets.items()}, gaps=counts,
                longest=[{"us": round(g, 1), "after": a[:60], "before": b[:60]}
                         for g, a, b in sorted(gaps, reverse=True)[:top]])


def autocast(device: torch.device | str):
    """bf16 autocast on the GPU (as the pipelines run), nothing on the CPU (smoke runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """``torch.backends.cudnn.benchmark`` set to ``on`` inside the block (cuDNN times its algorithms per shape),
    restored after (NOTES A51's rows)."""
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def compiled(fn: Callable, mode: str, smoke: bool, dynamic: bool | None = False,
             options: dict | None = None) -> Callable:
    """torch.compile(fn, mode), static shapes by default (a new batch size recompiles instead of
    switching to a slower dynamic-shape kernel); ``options``: inductor options for the default mode.
    Smoke runs use the 'eager' backend (dynamo traces, no code generation), which exercises the compile
    path on the CPU in seconds. Errors surface at the first call: make that call through
    ``first_call_or_eager``."""
    if smoke:
        return torch.compile(fn, backend="eager", dynamic=dynamic)
    if options:
        if mode != "default":
            raise ValueError(f"inductor options go with the default mode, not {mode!r}")
        return torch.compile(fn, dynamic=dynamic, options=options)
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=dynamic)


def first_call_or_eager(fast: Callable, eager: Callable | None, status: dict) -> Callable | None:
    """Call ``fast`` once (compiling it) and return it; on any exception return ``eager`` instead and
    record why in status['compile']. Also records the seconds the first call took (status['compile_s'])."""
    t0 = time.perf_counter()
    try:
        fast()
        sync()
        status["compile_s"] = round(time.perf_counter() - t0, 1)
        return fast
    except Exception as e:      # noqa: BLE001 - any compile/capture failure -> eager, recorded in the row
        free_memory()
        status["compile"] = f"failed -> eager ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        log.warning("compile failed, running eagerly: %s", e)
        return eager


def is_oom(e: BaseException) -> bool:
    """CUDA out-of-memory, also as cuBLAS / cuDNN report it."""
    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def seconds_left(margin: float = 0.0) -> float | None:
    """Seconds until run_all's deadline for this job (env BENCH_DEADLINE, epoch seconds), or None."""
    deadline = os.environ.get("BENCH_DEADLINE")
    return None if not deadline else max(1.0, float(deadline) - time.time() - margin)


def search_max_batch(probe: Callable[[int], None], start: int, limit: int, max_attempts: int = 10,
                     bisect: bool = True) -> dict:
    """Largest batch for which ``probe(batch)`` runs without running out of memory: double from
    ``start`` until an OOM (or ``limit``), then bisect between the last fit and the first OOM (to
    within 1/16), at most ``max_attempts`` probes in all. Other errors propagate.
    Returns {max_batch, first_oom, capped_at_limit, attempts: [(batch, ok, peak_gb)]}."""
    attempts: list[tuple[int, bool, float | None]] = []
    fit, oom = None, None

    def run(b: int) -> bool:
        free_memory()
        reset_peak_memory()
        try:
            probe(b)
            sync()
            ok = True
        except Exception as e:   # noqa: BLE001 - an OOM is the answer; anything else is a bug
            if not is_oom(e):
                raise
            ok = False
        attempts.append((b, ok, peak_memory_gb()))
        free_memory()
        return ok

    b = start
    while len(attempts) < max_attempts:
        if not run(b):
            oom = b
            break
        fit = b
        if b >= limit:
            break
        b = min(b * 2, limit)
    while bisect and fit is not None and oom is not None and oom - fit > max(1, fit // 16) \
            and len(attempts) < max_attempts:
        mid = (fit + oom) // 2
        if run(mid):
            fit = mid
        else:
            oom = mid
    return {"max_batch": fit, "first_oom": oom, "capped_at_limit": oom is None and fit == limit,
            "attempts": attempts}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def results_file(name: str) -> Path:
    """A device's accumulated results: benchmarks/results/<name>.json (name: the device slug, or slug-quality)."""
    return repo_root() / "benchmarks" / "results" / f"{name}.json"


def default_emoji_cache(env=os.environ) -> None:
    """Set TESSERA_CACHE in ``env`` to the repository's cache/ when it is unset and holds an emoji render:
    the render carried to the GPU machine, which has no emoji packages to render it."""
    if not env.get("TESSERA_CACHE") and (repo_root() / "cache" / "emoji").is_dir():
        env["TESSERA_CACHE"] = str(repo_root() / "cache")


def make_lpips_importable() -> str | None:
    """lpips travels to the GPU machine as a wheel in .whl/ (no pip install there): a wheel is a zip,
    so unpack it into /tmp and put that on sys.path and PYTHONPATH (for subprocesses). Returns the
    directory added, or None when lpips is already importable or no wheel is there."""
    if importlib.util.find_spec("lpips") is not None:
        return None
    wheels = sorted((repo_root() / ".whl").glob("lpips-*.whl"))
    if not wheels:
        return None
    target = Path("/tmp/tessera-bench-site")
    if not (target / "lpips").is_dir():
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    return str(target)
