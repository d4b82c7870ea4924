"""Quality benchmark of the trained demo models (checkpoints/train_all.sh's OUT): one results table.

    python3 -m benchmarks.quality --models runs/demo [--num-samples 1000] [--out quality.json]
    python3 -m benchmarks.quality --smoke       # CPU, tiny untrained models: proves the code path, no numbers

For each generator family present (masked at 8 and 16 steps and AR on OUT/tokenizer; VAR on OUT/msvq),
through ``pipelines.evaluate.evaluate``: Frechet distance, precision, recall and class accuracy of N
class-balanced samples in the feature space of OUT/classifier (named in the output: not Inception, so
never called FID), and the real-vs-real floor (val vs train images); validation bits per token on the
val token cache (OUT/tokens/val, OUT/tokens-msvq/val; AR and VAR exact NLL, masked the NELBO, an
upper bound); parameters; images/s of sampling + decoding at batch 64 on the device. Tokenizers: val
PSNR, SSIM, codebook usage and perplexity (per scale for msvq). Then the issue's targets, each met or
missed by how much: class accuracy >= 90% per family; masked@16 FD <= 1.1 x AR's FD; every family's
FD <= 2 x the floor's. Writes JSON (--out) and, under run_all, one row per table line (--rows-out).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.common import RowSink, default_emoji_cache, device_facts, sync, time_fn, timing, write_json

logger = logging.getLogger("bench.quality")


class Family(NamedTuple):
    name: str            # row label
    dir: str             # generator dir under --models
    tokenizer: str       # its tokenizer dir under --models
    tokens: str          # its token cache under --models (train/ and val/)
    num_steps: int       # masked: sampling steps; AR / VAR ignore it (one token / one scale per step)


FAMILIES = (Family("masked@8", "masked", "tokenizer", "tokens", 8),
            Family("masked@16", "masked", "tokenizer", "tokens", 16),
            Family("ar", "ar", "tokenizer", "tokens", 16),
            Family("var", "var", "msvq", "tokens-msvq", 16))
TOKENIZERS = ("tokenizer", "msvq")
CLASS_ACC_TARGET = 0.90       # per family
MASKED_VS_AR_TARGET = 1.1     # masked@16 FD <= 1.1 x AR's FD
FLOOR_FACTOR_TARGET = 2.0     # every family's FD <= 2 x the real-vs-real floor's FD
SMOKE = dict(num_samples=18, batch=8)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def present(models: Path) -> list[Family]:
    return [f for f in FAMILIES if is_model_dir(models / f.dir) and is_model_dir(models / f.tokenizer)]


def dtype_note(device: torch.device) -> str:
    return "bf16 autocast (Linear weights stored in bf16: autocast_weights)" if device.type == "cuda" else "fp32"


def short_device(facts: dict) -> str:
    name = facts["device"]
    return next((chip for chip in ("H100", "H200", "A100") if chip in name), name.replace("NVIDIA ", ""))


# ---- measurements ----------------------------------------------------------------------------------
def throughput(models: Path, fam: Family, batch: int, cfg_scale: float, device, smoke: bool) -> dict:
    """Sampling + decoding images/s at ``batch`` (the pipelines' own path: ClassToImagePipeline.sample_images,
    bf16 autocast on the GPU; AR's decode step compiled there by default). First call timed apart."""
    from pipelines.generate import ClassToImagePipeline
    pipe = ClassToImagePipeline.from_pretrained(models / fam.tokenizer, models / fam.dir, device)
    classes = (torch.arange(batch) % pipe.generator.config.num_classes).to(pipe.device)
    g = pipe.torch_generator(0)
    run = lambda: pipe.sample_images(classes, g, num_steps=fam.num_steps, cfg_scale=cfg_scale)   # noqa: E731
    t0 = time.perf_counter()
    run()
    sync()
    first_s = time.perf_counter() - t0
    t = time_fn(run, warmup=max(timing(smoke)["warmup"] - 1, 0), iters=timing(smoke)["iters"])
    compile_note = "eager"
    if fam.dir == "ar" and pipe.device.type == "cuda":       # AR compiles its decode step by default on CUDA
        fell_back = not getattr(pipe.generator._compiled, "compiled", False)
        compile_note = ("AR decode step: torch.compile failed -> eager (see the log)" if fell_back else
                        "AR decode step: torch.compile reduce-overhead (the default on CUDA)")
    return {"batch": batch, "median_s": t["median_s"], "images_per_s": batch / t["median_s"], "first_call_s": first_s,
            "includes": "token sampling + decoding", "cfg_scale": cfg_scale, "compile": compile_note}


def bits_per_token(models: Path, fam: Family, device) -> dict:
    """Mean bits per token over the whole val token cache (masked: the seeded NELBO estimate, a bound)."""
    from pipelines.data import TokenDataset
    from pipelines.loading import load_generator_dir, load_tokenizer
    from pipelines.train_generator import val_bits_per_token
    val_dir = models / fam.tokens / "val"
    if not (val_dir / "info.json").is_file():
        return {"bits_per_token": None, "note": f"no val token cache at {val_dir}"}
    val = TokenDataset(val_dir)
    tokenizer = load_tokenizer(models / fam.tokenizer, device)
    val.check_tokenizer(tokenizer)                 # the cache must be this tokenizer's tokens
    gen = load_generator_dir(models / fam.dir, device).model
    if fam.dir == "var":
        gen.set_codec(tokenizer)
    kind = {"masked": "NELBO (upper bound on the NLL), 16 stratified mask counts, seed 0",
            "ar": "exact NLL", "var": "exact NLL"}[fam.dir]
    return {"bits_per_token": val_bits_per_token(gen, val, max_items=len(val), batch_size=64, seed=0),
            "val_items": len(val), "estimator": kind, "params": gen.num_params()}


def classifier_on_val(models: Path, data: str, device) -> dict:
    """The classifier's own accuracy on every val image, plain and class-balanced: its ceiling for the
    'class acc' column (a generator's samples are judged by this network)."""
    from torch.utils.data import DataLoader
    from pipelines.classifier import EmojiClassifier
    from pipelines.data import DataConfig, build_image_dataset
    clf = EmojiClassifier.from_pretrained(models / "classifier", device)
    val = build_image_dataset(DataConfig(dataset=data, resolution=clf.config.resolution, hflip=False), "val")
    preds = torch.cat([clf.logits(x).argmax(-1).cpu() for x, _ in DataLoader(val, batch_size=256)])   # to its device
    labels = torch.as_tensor(val.labels)
    per_class = [float((preds[labels == c] == c).double().mean()) for c in range(len(val.class_names))
                 if (labels == c).any()]
    return {"accuracy": float((preds == labels).double().mean()), "balanced_accuracy": sum(per_class) / len(per_class),
            "per_class": dict(zip(val.class_names, per_class)), "num_val": len(val), "feature_space": clf.feature_space}


# ---- targets ------------------------------------------------------------------------------------
def check_targets(families: dict, floor: dict | None) -> list[dict]:
    """Each target: met, or missed by how much (class accuracy in percentage points, FD in FD units)."""
    out = []
    for name in (f.name for f in FAMILIES):
        r = families.get(name)
        acc = r and r.get("class_acc")
        text = ("not run" if acc is None else
                f"met ({acc:.1%})" if acc >= CLASS_ACC_TARGET else
                f"missed by {100 * (CLASS_ACC_TARGET - acc):.1f} pp ({acc:.1%})")
        out.append({"target": f"class accuracy >= {CLASS_ACC_TARGET:.0%}", "family": name, "value": acc,
                    "met": None if acc is None else acc >= CLASS_ACC_TARGET, "text": text})
    m, a = (families.get(n, {}).get("fd") for n in ("masked@16", "ar"))
    if m is None or a is None:
        text, met = "not run (needs masked@16 and ar)", None
    else:
        bound = MASKED_VS_AR_TARGET * a
        met = m <= bound
        text = (f"met ({m:.4g} <= {bound:.4g})" if met else f"missed by {m - bound:.4g} "
                f"({m:.4g} > {MASKED_VS_AR_TARGET} x {a:.4g} = {bound:.4g}; ratio {m / a:.2f})")
    out.append({"target": f"masked@16 FD <= {MASKED_VS_AR_TARGET} x AR FD", "family": "masked@16",
                "value": None if m is None or a is None else m / a, "met": met, "text": text})
    for name in (f.name for f in FAMILIES):
        fd = families.get(name, {}).get("fd")
        if fd is None or floor is None:
            text, met, ratio = "not run", None, None
        else:
            bound = FLOOR_FACTOR_TARGET * floor["fd"]
            ratio = fd / floor["fd"] if floor["fd"] > 0 else math.inf
            met = fd <= bound
            text = (f"met ({fd:.4g} <= {bound:.4g}; {ratio:.2f}x floor)" if met else f"missed by {fd - bound:.4g} "
                    f"({fd:.4g} > {FLOOR_FACTOR_TARGET} x {floor['fd']:.4g}; {ratio:.2f}x floor)")
        out.append({"target": f"FD <= {FLOOR_FACTOR_TARGET} x real-vs-real floor", "family": name, "value": ratio,
                    "met": met, "text": text})
    return out


# ---- tables ---------------------------------------------------------------------------------------
def _n(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _params(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _md(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


GEN_HEADER = ("family", "steps", "params", "images/s ({device}, batch {batch})", "FD", "precision", "recall",
              "class acc", "bits/token")
TOK_HEADER = ("tokenizer", "params", "PSNR (dB)", "SSIM", "LPIPS", "codebook usage", "perplexity",
              "per scale (side: usage / perplexity)", "FD recon", "class acc recon / real")


def format_tables(res: dict) -> str:
    """The results table (README shape), the tokenizer table, what the numbers are, and the targets."""
    facts, s, lines = res["facts"], res["settings"], []
    if res["smoke"]:
        lines += ["SMOKE RUN (CPU, tiny untrained models): no number below is a measurement.", ""]
    header = [h.format(device=short_device(facts), batch=s["batch"]) for h in GEN_HEADER]
    lines += [_md(*header), "|" + "---|" * len(header)]
    for f in FAMILIES:
        r = res["families"].get(f.name)
        if r is None:
            continue
        if r.get("error"):
            lines.append(_md(f.name, "-", "-", f"ERROR: {r['error'][:100]}", *[""] * 5))
            continue
        bits = _n(r.get("bits_per_token"), ".3f")
        lines.append(_md(f.name, f.num_steps if f.dir == "masked" else "-", _params(r.get("params")),
                         _n(r.get("images_per_s"), ".1f"), _n(r.get("fd"), ".4g"), _n(r.get("precision"), ".3f"),
                         _n(r.get("recall"), ".3f"), _n(r.get("class_acc"), ".1%"),
                         f"{bits} (NELBO)" if f.dir == "masked" and bits != "-" else bits))
    fl = res.get("floor")
    if fl:
        lines.append(_md("real floor (val vs train)", "-", "-", "-", _n(fl["fd"], ".4g"), _n(fl["precision"], ".3f"),
                         _n(fl["recall"], ".3f"), _n(fl["class_acc"], ".1%"), "-"))
    lines += ["", _md(*TOK_HEADER), "|" + "---|" * len(TOK_HEADER)]
    for name, t in res["tokenizers"].items():
        if t.get("error"):
            lines.append(_md(name, f"ERROR: {t['error'][:100]}", *[""] * 8))
            continue
        scales = ", ".join(f"{x['side']}: {x['usage']:.3f} / {x['perplexity']:.1f}" for x in t["per_scale"]) or "-"
        lpips = t["lpips"] if isinstance(t["lpips"], (int, float)) else None      # a string when unavailable
        lines.append(_md(name, _params(t["params"]), _n(t["psnr"], ".2f"), _n(t["ssim"], ".4f"), _n(lpips, ".4f"),
                         f"{t['usage']:.3f} of {t['codebook_size']}", f"{t['perplexity']:.1f}", scales,
                         _n(t.get("fd_recon"), ".4g"),
                         f"{_n(t.get('class_acc_recon'), '.1%')} / {_n(t.get('class_acc_real'), '.1%')}"))
    c = res.get("classifier_on_val") or {}
    lines += ["", f"FD / precision / recall / class acc: {s['num_samples']} class-balanced samples vs as many train "
                  f"images, in the feature space [{res.get('feature_space')}] (a stand-in classifier, not Inception: "
                  f"not an FID; compare numbers of one N only). cfg {s['cfg_scale']}, temperature 1, seed {s['seed']}.",
              f"real floor: {fl['what'] if fl else '-'}.",
              f"classifier on all {c.get('num_val', '-')} val images: accuracy {_n(c.get('accuracy'), '.1%')}, "
              f"class-balanced {_n(c.get('balanced_accuracy'), '.1%')} (the ceiling of 'class acc').",
              "bits/token: mean over the whole val token cache; masked = NELBO (an upper bound on its NLL; one model "
              "for both step counts), AR / VAR exact NLL.",
              f"images/s: {facts['device']}, torch {facts['torch']}, {res['dtype']}, batch {s['batch']}, sampling + "
              f"decoding, median of timed calls after warm-up; AR: {res.get('ar_compile', '-')}.",
              f"Inception: {res.get('inception', '-')}", "", "targets:"]
    lines += [f"  {t['target']:<40} {t['family']:<10} {t['text']}" for t in res["targets"]]
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------------
def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def measure_family(models: Path, fam: Family, data: str, cfg, device, smoke: bool,
                   bits_cache: dict) -> tuple[dict, dict]:
    """One family's row and its ``evaluate`` results (generation + its tokenizer's reconstruction)."""
    from pipelines.evaluate import evaluate
    options = {"compile": False} if fam.dir == "ar" else None      # AR's compiled path is timed by throughput()
    ev = evaluate(models / fam.tokenizer, data, models / fam.dir, models / "classifier", cfg, device, "auto", options)
    c, fl = ev["generation"]["classifier"], ev["generation"]["real_floor"]
    row = {"steps": fam.num_steps if fam.dir == "masked" else None, "fd": c["frechet_distance"],
           "precision": c["precision"], "recall": c["recall"], "class_acc": c["class_accuracy"], "n": c["n_fake"],
           "floor": {"fd": fl["frechet_distance"], "precision": fl["precision"], "recall": fl["recall"],
                     "class_acc": fl["class_accuracy"], "what": fl["what"], "n": fl["n_fake"]}}
    if fam.dir not in bits_cache:                                   # masked@8 and @16: one model
        bits_cache[fam.dir] = bits_per_token(models, fam, device)
    bits = bits_cache[fam.dir]
    row.update(bits_per_token=bits.get("bits_per_token"), params=bits.get("params"),
               bits_estimator=bits.get("estimator"), bits_note=bits.get("note"))
    row["throughput"] = throughput(models, fam, cfg.batch_size, cfg.cfg_scale, device, smoke)
    row["images_per_s"] = row["throughput"]["images_per_s"]
    return row, ev


def tokenizer_row(models: Path, name: str, recon: dict) -> dict:
    from pipelines.loading import load_tokenizer
    tok = load_tokenizer(models / name, "cpu")
    cb, clf = recon["codebook"], recon.get("classifier", {})
    return {"params": sum(p.numel() for p in tok.parameters()), "psnr": recon["psnr"], "ssim": recon["ssim"],
            "lpips": recon["lpips"], "usage": cb["usage"], "perplexity": cb["perplexity"], "codebook_size": cb["size"],
            "per_scale": cb.get("per_scale", []), "fd_recon": clf.get("frechet_distance"),
            "class_acc_recon": clf.get("class_accuracy_recon"), "class_acc_real": clf.get("class_accuracy_real"),
            "num_images": recon["num_images"], "grid_size": tok.grid_size, "scales": list(getattr(tok, "scales", ()))}


def write_rows(sink: RowSink, res: dict) -> None:
    """One JSON line per table line for benchmarks.run_all."""
    for name, r in res["families"].items():
        sink.add(bench="quality", name=name, batch=res["settings"]["batch"], feature_space=res["feature_space"],
                 **{k: v for k, v in r.items() if k not in ("throughput", "floor")})
    if res.get("floor"):
        sink.add(bench="quality", name="real floor (val vs train)", **res["floor"])
    for name, t in res["tokenizers"].items():
        sink.add(bench="quality-tokenizer", name=name, **t)
    for t in res["targets"]:
        sink.add(bench="quality-target", name=f"{t['family']}: {t['target']}", **t)


def run(models: Path, data: str, num_samples: int, batch: int, cfg_scale: float, seed: int, device,
        smoke: bool, sink: RowSink | None = None) -> dict:
    from pipelines.evaluate import EvalConfig, evaluate
    from pipelines.loading import pick_device
    device = pick_device(device)
    if not is_model_dir(models / "classifier"):
        raise ValueError(f"no classifier at {models / 'classifier'}: the feature space of every generation metric")
    fams = present(models)
    if not fams and not any(is_model_dir(models / t) for t in TOKENIZERS):
        raise ValueError(f"nothing to measure under {models}: expected model dirs {list(TOKENIZERS)} and "
                         f"{sorted({f.dir for f in FAMILIES})} (checkpoints/train_all.sh's layout)")
    res = {"smoke": smoke, "facts": device_facts(), "models": str(models), "data": data, "device": str(device),
           "dtype": dtype_note(device), "families": {}, "tokenizers": {}, "evaluate": {}, "warnings": [],
           "settings": {"num_samples": num_samples, "batch": batch, "cfg_scale": cfg_scale, "seed": seed}}
    res["classifier_on_val"] = classifier_on_val(models, data, device)
    res["feature_space"] = res["classifier_on_val"]["feature_space"]
    bits_cache, recon = {}, {}
    for fam in fams:
        t0 = time.perf_counter()
        cfg = EvalConfig(num_samples=num_samples, num_steps=fam.num_steps, cfg_scale=cfg_scale, seed=seed,
                         batch_size=batch)
        try:
            row, ev = measure_family(models, fam, data, cfg, device, smoke, bits_cache)
            res["evaluate"][fam.name], res["inception"] = ev, str(ev["inception"])
            recon.setdefault(fam.tokenizer, ev["reconstruction"])
            floor = res.setdefault("floor", row["floor"])     # the same draw for every family: checked
            if abs(floor["fd"] - row["floor"]["fd"]) > 1e-6 * max(1.0, floor["fd"]):
                res["warnings"].append(f"{fam.name}: real floor FD {row['floor']['fd']} != {floor['fd']}")
            if fam.dir == "ar":
                res["ar_compile"] = row["throughput"]["compile"]
        except Exception as e:          # noqa: BLE001 - one family's failure must not lose the others' rows
            logger.exception("%s failed", fam.name)
            row = {"error": _error(e)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        res["families"][fam.name] = row
        print(f"  {fam.name}: {'ERROR ' + row['error'] if 'error' in row else 'done'} in {row['wall_s']:.0f} s",
              flush=True)
    for name in (t for t in TOKENIZERS if is_model_dir(models / t)):
        try:
            if name not in recon:     # a tokenizer without a generator here: reconstruction only
                ev = evaluate(models / name, data, None, models / "classifier",
                              EvalConfig(num_samples=num_samples, seed=seed, batch_size=batch), device, "auto")
                recon[name] = ev["reconstruction"]
                res.setdefault("inception", str(ev["inception"]))
            res["tokenizers"][name] = tokenizer_row(models, name, recon[name])
        except Exception as e:          # noqa: BLE001
            logger.exception("tokenizer %s failed", name)
            res["tokenizers"][name] = {"error": _error(e)}
    res["targets"] = check_targets({k: v for k, v in res["families"].items() if "error" not in v}, res.get("floor"))
    if sink is not None:
        write_rows(sink, res)
    return res


def build_smoke_models(root: Path) -> tuple[Path, str]:
    """Tiny untrained artefacts laid out like checkpoints/train_all.sh's OUT, on a 3-class ImageFolder of
    16 px images (root/images/{train,val}/<class>/): the test helpers' tokenizers (vq 8x8 of 64 codes;
    msvq scales 1, 2, 4 of 32 codes), one generator per family, a tiny classifier, and both token caches.
    Returns (models dir, data folder)."""
    import numpy as np
    from PIL import Image
    from pipelines.classifier import ClassifierConfig, EmojiClassifier
    from pipelines.data import DataConfig, build_image_dataset, tokenize_dataset
    from pipelines.loading import write_meta
    from tests.pipelines.test_generate import make_generator_dir
    from tests.pipelines.test_train_generator import make_tokenizer

    names, rng = ["blue", "green", "red"], np.random.default_rng(0)
    images = root / "images"
    for split, n in (("train", 12), ("val", 6)):
        for c, name in enumerate(names):
            (images / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                arr[4:12, 4:12, 2 - c] = 255          # a coloured square: blue, green, red
                Image.fromarray(arr).save(images / split / name / f"{i}.png")
    models = root / "models"
    toks = {"tokenizer": make_tokenizer(models / "tokenizer"), "msvq": make_tokenizer(models / "msvq", multiscale=True)}
    for tok_name, cache in (("tokenizer", "tokens"), ("msvq", "tokens-msvq")):
        for split in ("train", "val"):
            dataset = build_image_dataset(DataConfig(dataset=str(images), resolution=16, hflip=False), split)
            tokenize_dataset(toks[tok_name], dataset, models / cache / split, batch_size=16, flips=split == "train")
    for kind, tok_name in (("masked", "tokenizer"), ("ar", "tokenizer"), ("var", "msvq")):
        tok = toks[tok_name]
        path = make_generator_dir(models / kind, kind, tok)
        write_meta(path, tok.fingerprint(), names, {"grid_size": tok.grid_size, "scales": list(tok.config.scales)})
    torch.manual_seed(0)
    EmojiClassifier(ClassifierConfig(arch="resnet10t", channels=(8, 8, 8, 8), stem_width=8, resolution=16,
                                     num_classes=3, class_names=tuple(names), dataset=str(images))
                    ).save(models / "classifier")
    return models, str(images)


def smoke_setup() -> None:
    """CPU, one thread, no oneDNN (tiny convs: it builds a kernel per shape), no downloaded weights."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of quality.py and inpainting.py after their own: guidance, seed, device, outputs, smoke."""
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny untrained models on the CPU (built in a temp dir)")
    p.add_argument("--rows-out", help="append result rows here as JSON lines (benchmarks.run_all)")


@contextlib.contextmanager
def models_to_measure(a: argparse.Namespace, p: argparse.ArgumentParser, name: str, smoke_counts: dict):
    """Logging and the emoji cache set up; ``a.models`` / ``a.data`` the trained models, or with
    ``--smoke`` tiny untrained ones built in a temp dir that lives as long as the context, measured on
    the CPU with ``smoke_counts`` (e.g. batch, num_samples) set on ``a``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    default_emoji_cache()
    with tempfile.TemporaryDirectory(prefix=f"tessera-{name}-smoke-") as tmp:
        if a.smoke:
            smoke_setup()
            a.models, a.data = build_smoke_models(Path(tmp)) if a.models is None else (a.models, a.data)
            a.device = "cpu"
            for key, value in smoke_counts.items():
                setattr(a, key, value)
        elif a.models is None:
            p.error("--models DIR is required (or --smoke)")
        yield


def write_results(res: dict, a: argparse.Namespace, name: str) -> None:
    """To --out, or for a smoke run to /tmp/tessera-bench/<name>-smoke.json."""
    out = a.out or (f"/tmp/tessera-bench/{name}-smoke.json" if a.smoke else None)
    if out:
        write_json(out, res)
        print(f"\n{res['wall_s']:.0f} s; wrote {out}")


def speed_only(models: Path, batch: int, cfg_scale: float, device, smoke: bool, out: str | None) -> int:
    """images/s (sampling + decoding) of every family present, nothing else: the results table's CPU column."""
    from pipelines.loading import pick_device
    device = pick_device(device)
    facts = device_facts()
    where = facts["device"] if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res = {"smoke": smoke, "facts": facts, "device": where, "dtype": dtype_note(device), "batch": batch,
           "cfg_scale": cfg_scale, "families": {}}
    print(f"| family | images/s ({where}, batch {batch}, {res['dtype']}, cfg {cfg_scale}) | median s / batch |")
    print("|---|---|---|")
    for fam in present(models):
        try:
            r = throughput(models, fam, batch, cfg_scale, device, smoke)
            print(f"| {fam.name} | {r['images_per_s']:.1f} | {r['median_s']:.3f} |", flush=True)
        except Exception as e:          # noqa: BLE001 - report the family, keep the others
            r = {"error": _error(e)}
            print(f"| {fam.name} | ERROR {r['error']} | - |", flush=True)
        res["families"][fam.name] = r
    if out:
        write_json(out, res)
        print(f"wrote {out}")
    return 1 if any("error" in r for r in res["families"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, help="checkpoints/train_all.sh's OUT (tokenizer, msvq, classifier, masked, "
                                               "ar, var, tokens, tokens-msvq)")
    p.add_argument("--data", default="emoji", help="'emoji' (default) or an image folder with the models' classes")
    p.add_argument("--num-samples", type=int, default=1000, metavar="N", help="samples per family (and real images)")
    p.add_argument("--batch", type=int, default=64, help="sampling batch, also of the images/s timing")
    add_run_args(p)
    p.add_argument("--speed-only", action="store_true",
                   help="only images/s of each family (e.g. --device cpu --batch 8 for the CPU column)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    with models_to_measure(a, p, "quality", SMOKE):
        if a.speed_only:
            return speed_only(a.models, a.batch, a.cfg_scale, a.device, a.smoke, a.out)
        print(f"quality: {a.models} on {a.device or 'auto'}; {a.num_samples} samples per family", flush=True)
        sink = RowSink(a.rows_out, "quality", a.smoke) if a.rows_out else None
        res = run(a.models, a.data, a.num_samples, a.batch, a.cfg_scale, a.seed, a.device, a.smoke, sink)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(format_tables(res))
    write_results(res, a, "quality")
    failed = [n for n, r in {**res["families"], **res["tokenizers"]}.items() if r.get("error")]
    for w in res["warnings"]:
        print(f"WARNING: {w}")
    return 1 if failed or res["warnings"] else 0


if __name__ == "__main__":
    sys.exit(main())
