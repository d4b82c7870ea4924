"""Scaling efficiency of the runs written by gen.sh / tok.sh: medians over the log windows after step 20.

    python3 benchmarks/scaling/summary.py NAME KEY PER_IMAGE RUN_DIR [RUN_DIR ...]

The first RUN_DIR is the 1-GPU baseline; each further one is compared with it. Prints one line per run
and merges the rows into $OUT/scaling.json (or ./scaling.json) with the device and torch version.
"""
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch


def rate(run_dir: Path, key: str, per_image: int) -> dict:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    rows = [r for r in rows if key in r and r["step"] > 20]
    if not rows:
        raise SystemExit(f"{run_dir}: no log window after step 20 holds {key!r}")
    return {"images_per_s": statistics.median(r[key] / per_image for r in rows),
            "data_wait": statistics.median(r["data_wait"] for r in rows),
            "step_time_s": statistics.median(r["step_time"] for r in rows), "windows": len(rows)}


def main() -> None:
    name, key, per_image, *runs = sys.argv[1:]
    out = Path(os.environ.get("OUT", "."))
    results = []
    for run in map(Path, runs):
        gpus = int(run.name.split("-")[1])          # <name>-<gpus>[-<variant>]
        r = rate(run, key, int(per_image)) | {"run": run.name, "gpus": gpus}
        r["per_gpu"] = r["images_per_s"] / gpus
        if results:
            r["scaling_efficiency"] = r["per_gpu"] / results[0]["per_gpu"]
        results.append(r)
        shutil.copy(run / "metrics.jsonl", out / f"{run.name}-metrics.jsonl")
        eff = f"; scaling efficiency {r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else ""
        print(f"{run.name}: {gpus} GPU(s) {r['images_per_s']:.1f} img/s = {r['per_gpu']:.1f} per GPU "
              f"(step {r['step_time_s'] * 1e3:.0f} ms, data wait {r['data_wait']:.1%}){eff}")
    path = out / "scaling.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("device", f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
                   if torch.cuda.is_available() else "cpu")
    doc.setdefault("torch", torch.__version__)
    doc[name] = results
    path.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
