"""Inpainting benchmark of the trained demo models on val images: how well each generator family fills a hole.

    python3 -m benchmarks.inpainting --models runs/demo [--num-images 180] [--out inpainting.json]
    python3 -m benchmarks.inpainting --smoke      # CPU, tiny untrained models: proves the code path, no numbers

Images: N class-balanced val images (as balanced as the split allows; seeded). Masks: a centred square
of 25% and of ~50% of the area, and a free-form brush (pipelines.demo.brush_mask, seeded per image).
Each family (masked at 8 and 16 steps, AR, VAR) fills the hole given the image's own class (cfg 2,
InpaintPipeline's defaults: no dilation, no feather). Per family and mask: PSNR and mean absolute error
(pixels in [0, 1]) inside the mask against the original (LPIPS-free), and the classifier's accuracy on
the inpainted images. Reference rows: each tokenizer's own reconstruction pasted into the hole (what
the tokens of the hole can give back at best) and the classifier on the untouched originals.

Outside the mask every output pixel must equal the (pipeline-resized) input bit for bit: checked on every
image, the run exits 1 if any differs. Images go through InpaintPipeline's own steps in batches
(``prepare``, ``known_tokens``, ``sample_images``, ``paste``: what ``__call__`` does for one image);
one ``InpaintPipeline.__call__`` per family and mask checks the user path the same way.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RowSink, device_facts
from benchmarks.quality import (Family, _error, add_run_args, is_model_dir, models_to_measure, present,
                                write_results)

logger = logging.getLogger("bench.inpainting")
MASKS = ("box25", "box50", "brush")
PSNR_CAP_DB = 100.0           # a pixel-perfect hole would be +inf; capped so means stay finite
SMOKE = dict(num_images=18, batch=8)


def centre_box(resolution: int, area: float) -> tuple[int, int, int, int]:
    """A centred square of ~``area`` of the image (side rounded to whole pixels): (x0, y0, x1, y1)."""
    side = round(resolution * math.sqrt(area))
    x0 = (resolution - side) // 2
    return x0, x0, x0 + side, x0 + side


def make_mask(kind: str, resolution: int, image_index: int, seed: int):
    from pipelines.demo import brush_mask
    if kind == "brush":
        return brush_mask(resolution, seed + image_index)
    return centre_box(resolution, {"box25": 0.25, "box50": 0.5}[kind])


def pick_images(val, n: int, seed: int) -> list[int]:
    """``n`` val indices, classes as balanced as the split allows (pipelines.evaluate's water-filling), seeded."""
    from pipelines.evaluate import class_quota, draw_by_class
    labels = torch.as_tensor(val.labels, dtype=torch.long)
    quota = class_quota(torch.bincount(labels, minlength=len(val.class_names)), n)
    return sorted(draw_by_class(labels, quota, torch.Generator().manual_seed(seed)))


def u8(image_3RR: torch.Tensor) -> np.ndarray:
    """[-1, 1] (3, R, R) -> uint8 (R, R, 3), exactly as the pipelines write images (tensor_to_pil)."""
    from pipelines.images import tensor_to_pil
    return np.asarray(tensor_to_pil(image_3RR[None])[0])


def hole_scores(out_RR3: np.ndarray, orig_RR3: np.ndarray, mask_RR: np.ndarray) -> dict:
    """PSNR (dB, [0, 1] pixels, capped) and mean absolute error inside the mask; whether outside is identical."""
    diff = (out_RR3.astype(np.float64) - orig_RR3.astype(np.float64))[mask_RR] / 255.0
    mse = float((diff ** 2).mean())
    psnr = PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(1.0 / mse))
    return {"psnr": psnr, "mae": float(np.abs(diff).mean()),
            "outside_identical": bool(np.array_equal(out_RR3[~mask_RR], orig_RR3[~mask_RR]))}


@torch.no_grad()
def inpaint_batch(pipe, inputs: list, labels: list[int], generator: torch.Generator, **sampling) -> list[np.ndarray]:
    """InpaintPipeline.__call__'s steps for a batch of (image, mask) pairs, one class each -> uint8 (R, R, 3)."""
    from pipelines.images import paste, token_mask
    image_B3RR = torch.stack([x.image_3RR for x in inputs])
    mask_BRR = torch.stack([x.mask_RR for x in inputs])
    unknown_Bhw = token_mask(mask_BRR, pipe.tokenizer.grid_size)
    known_ids, known_mask = pipe.known_tokens(image_B3RR, unknown_Bhw, 1)
    classes_B = torch.tensor(labels, dtype=torch.long, device=pipe.device)
    generated_B3RR = pipe.sample_images(classes_B, generator, known_ids=known_ids, known_mask=known_mask,
                                        batch_size=len(inputs), **sampling)
    return [u8(x) for x in paste(image_B3RR, generated_B3RR, mask_BRR).cpu()]


@torch.no_grad()
def recon_batch(tokenizer, inputs: list) -> list[np.ndarray]:
    """The tokenizer's reconstruction pasted into the hole: the best a generator can give back through it."""
    from pipelines.images import paste
    image_B3RR = torch.stack([x.image_3RR for x in inputs]).to(tokenizer.last_layer.device)
    mask_BRR = torch.stack([x.mask_RR for x in inputs])
    if getattr(tokenizer.config, "quantizer", "vq") == "multiscale":
        recon = tokenizer.decode_scales(tokenizer.encode_scales(image_B3RR))
    else:
        recon = tokenizer.decode(tokenizer.encode(image_B3RR))
    return [u8(x) for x in paste(image_B3RR, recon.float(), mask_BRR).cpu()]


def class_accuracy(classifier, images: list[np.ndarray], labels: list[int], batch: int) -> float:
    preds = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        preds.append(classifier.logits(x).argmax(-1).cpu())
    return float((torch.cat(preds) == torch.tensor(labels)).double().mean())


def score_rows(outs: list[np.ndarray], origs: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    s = [hole_scores(o, g, m) for o, g, m in zip(outs, origs, masks)]
    return {"psnr": float(np.mean([x["psnr"] for x in s])), "mae": float(np.mean([x["mae"] for x in s])),
            "outside_identical": all(x["outside_identical"] for x in s),
            "outside_differs": [i for i, x in enumerate(s) if not x["outside_identical"]],
            "mask_fraction": float(np.mean([m.mean() for m in masks]))}


class Images:
    """The benchmark's val images (PIL, labels) and, per (tokenizer, mask kind), the pipeline's prepared inputs."""

    def __init__(self, pil: list, labels: list[int], resolution: int, seed: int):
        self.pil, self.labels, self.resolution, self.seed = pil, labels, resolution, seed
        self._prepared: dict[tuple[str, str], tuple[list, list, list]] = {}

    def mask(self, kind: str, i: int):
        return make_mask(kind, self.resolution, i, self.seed)

    def prepared(self, pipe, tokenizer: str, kind: str) -> tuple[list, list[np.ndarray], list[np.ndarray]]:
        """(InpaintInputs, originals uint8 (R, R, 3), masks bool (R, R)) as ``pipe.prepare`` makes them."""
        if (tokenizer, kind) not in self._prepared:
            inputs = [pipe.prepare(im, self.mask(kind, i)) for i, im in enumerate(self.pil)]
            self._prepared[tokenizer, kind] = (inputs, [u8(x.image_3RR) for x in inputs],
                                               [x.mask_RR.numpy() for x in inputs])
        return self._prepared[tokenizer, kind]


def family_rows(pipe, fam: Family, images: Images, classifier, cfg_scale: float, batch: int) -> list[dict]:
    """One row per mask kind: the family fills the hole of every image (batched), one real __call__ checked too."""
    from pipelines.generate import family_options
    options = {"compile": False} if "compile" in family_options(pipe.generator) else {}   # AR: speed not measured
    sampling = dict(num_steps=fam.num_steps, cfg_scale=cfg_scale, **options)
    rows = []
    for kind in MASKS:
        inputs, originals, masks = images.prepared(pipe, fam.tokenizer, kind)
        g, outs = pipe.torch_generator(images.seed), []
        for i in range(0, len(inputs), batch):
            outs += inpaint_batch(pipe, inputs[i:i + batch], images.labels[i:i + batch], g, **sampling)
        row = {"name": fam.name, "steps": fam.num_steps if fam.dir == "masked" else None, "mask": kind,
               **score_rows(outs, originals, masks), "unknown_token_fraction": unknown_fraction(pipe, inputs),
               "class_acc": class_accuracy(classifier, outs, images.labels, batch)}
        one = pipe(images.pil[0], images.mask(kind, 0), class_label=images.labels[0], seed=images.seed,
                   num_samples=1, **sampling)[0]           # the user path, on the first image
        row["call_outside_identical"] = hole_scores(np.asarray(one), originals[0], masks[0])["outside_identical"]
        rows.append(row)
    return rows


def recon_rows(pipe, tokenizer: str, images: Images, classifier, batch: int) -> list[dict]:
    """The tokenizer's own reconstruction pasted into each hole: the reference a generator can reach at best."""
    rows = []
    for kind in MASKS:
        inputs, originals, masks = images.prepared(pipe, tokenizer, kind)
        outs = [o for i in range(0, len(inputs), batch) for o in recon_batch(pipe.tokenizer, inputs[i:i + batch])]
        rows.append({"name": f"{tokenizer} recon", "steps": None, "mask": kind, **score_rows(outs, originals, masks),
                     "class_acc": class_accuracy(classifier, outs, images.labels, batch)})
    return rows


def run(models: Path, data: str, num_images: int, batch: int, cfg_scale: float, seed: int, device, smoke: bool,
        sink: RowSink | None = None) -> dict:
    from pipelines.classifier import EmojiClassifier
    from pipelines.data import DataConfig, build_image_dataset
    from pipelines.images import tensor_to_pil
    from pipelines.inpaint import InpaintPipeline
    from pipelines.loading import load_tokenizer, pick_device
    device = pick_device(device)
    if not is_model_dir(models / "classifier"):
        raise ValueError(f"no classifier at {models / 'classifier'}")
    fams = present(models)
    if not fams:
        raise ValueError(f"no generator family under {models}")
    classifier = EmojiClassifier.from_pretrained(models / "classifier", device)
    resolution = load_tokenizer(models / fams[0].tokenizer, "cpu").config.resolution
    val = build_image_dataset(DataConfig(dataset=data, resolution=resolution, hflip=False), "val")
    picks = pick_images(val, num_images, seed)
    images = Images([tensor_to_pil(val[i][0][None])[0] for i in picks], [int(val.labels[i]) for i in picks],
                    resolution, seed)
    res = {"smoke": smoke, "facts": device_facts(), "models": str(models), "data": data, "device": str(device),
           "settings": {"num_images": len(picks), "batch": batch, "cfg_scale": cfg_scale, "seed": seed,
                        "resolution": resolution, "dilate": 0, "feather": 0},
           "images": picks, "class_counts": np.bincount(images.labels, minlength=len(val.class_names)).tolist(),
           "feature_space": classifier.feature_space, "rows": []}
    originals = [np.asarray(im) for im in images.pil]
    res["rows"].append({"name": "original (no hole)", "mask": "-",
                        "class_acc": class_accuracy(classifier, originals, images.labels, batch)})
    pipes: dict[str, InpaintPipeline] = {}
    for fam in fams:
        t0 = time.perf_counter()
        try:
            if fam.dir not in pipes:            # masked@8 and @16 share one pipeline
                pipes[fam.dir] = InpaintPipeline.from_pretrained(models / fam.tokenizer, models / fam.dir, device)
            res["rows"] += family_rows(pipes[fam.dir], fam, images, classifier, cfg_scale, batch)
            if not any(r["name"] == f"{fam.tokenizer} recon" for r in res["rows"]):
                res["rows"] += recon_rows(pipes[fam.dir], fam.tokenizer, images, classifier, batch)
        except Exception as e:          # noqa: BLE001 - one family's failure must not lose the others' rows
            logger.exception("%s failed", fam.name)
            res["rows"].append({"name": fam.name, "mask": "-", "error": _error(e)})
        print(f"  {fam.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    bad = [r for r in res["rows"] if r.get("outside_identical") is False or r.get("call_outside_identical") is False]
    res["outside_check"] = ("every output pixel outside the mask equals the input" if not bad else "FAILED: " +
                            "; ".join(f"{r['name']} {r['mask']}: images {r.get('outside_differs')}" for r in bad))
    if sink is not None:
        for row in res["rows"]:
            sink.add(bench="inpainting", **{k: v for k, v in row.items() if k != "outside_differs"})
    return res


def unknown_fraction(pipe, inputs: list) -> float:
    from pipelines.images import token_mask
    return float(token_mask(torch.stack([x.mask_RR for x in inputs]), pipe.tokenizer.grid_size).float().mean())


def format_table(res: dict) -> str:
    lines = ["SMOKE RUN (CPU, tiny untrained models): no number below is a measurement.", ""] if res["smoke"] else []
    s = res["settings"]
    header = ("family", "steps", "mask", "masked px / tokens", "PSNR in mask (dB)", "MAE in mask", "class acc",
              "outside identical")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(res["rows"], key=lambda r: MASKS.index(r["mask"]) if r["mask"] in MASKS else -1):
        if r.get("error"):
            lines.append(f"| {r['name']} | - | - | ERROR: {r['error'][:100]} | | | | |")
            continue
        num = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)   # noqa: E731
        area = num("mask_fraction", ".0%") + (f" / {r['unknown_token_fraction']:.0%}" if "unknown_token_fraction" in r
                                               else "")
        same = "-" if "outside_identical" not in r else (
            "yes" if r["outside_identical"] and r.get("call_outside_identical", True) else "NO")
        cells = [r["name"], num("steps", "d"), r["mask"], area, num("psnr", ".2f"), num("mae", ".4f"),
                 num("class_acc", ".1%"), same]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{s['num_images']} val images (per class {res['class_counts']}), {s['resolution']} px; class given "
                  f"(the image's own), cfg {s['cfg_scale']}, seed {s['seed']}, no dilate / feather. Masks: box25 / "
                  "box50 = centred squares of 25% / ~50% of the area, brush = pipelines.demo.brush_mask(seed + image "
                  "index).",
              "PSNR (capped at 100 dB) and MAE over the masked pixels only, pixels in [0, 1], mean over images; "
              "'<tokenizer> recon' = the tokenizer's own reconstruction pasted into the hole (the best any generator "
              "can give back through those tokens).",
              f"class acc: the classifier [{res['feature_space']}] on the inpainted images vs the image's class.",
              f"outside the mask: {res['outside_check']}.",
              f"device: {res['facts']['device']}, torch {res['facts']['torch']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path,
                   help="checkpoints/train_all.sh's OUT (tokenizer, msvq, classifier, masked, ar, var)")
    p.add_argument("--data", default="emoji", help="'emoji' (default) or an image folder with the models' classes")
    p.add_argument("--num-images", type=int, default=180, metavar="N",
                   help="val images (class-balanced as far as the split allows)")
    p.add_argument("--batch", type=int, default=64)
    add_run_args(p)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    with models_to_measure(a, p, "inpainting", SMOKE):
        print(f"inpainting: {a.models} on {a.device or 'auto'}; {a.num_images} val images", flush=True)
        sink = RowSink(a.rows_out, "inpainting", a.smoke) if a.rows_out else None
        res = run(a.models, a.data, a.num_images, a.batch, a.cfg_scale, a.seed, a.device, a.smoke, sink)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(format_table(res))
    write_results(res, a, "inpainting")
    failed = any(r.get("error") for r in res["rows"]) or res["outside_check"].startswith("FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
