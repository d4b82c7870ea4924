"""``tessera evaluate``: reconstruction metrics of a tokenizer and, with ``--generator``, generation metrics.

Reconstruction (val split): PSNR, SSIM, LPIPS (when its VGG weights are cached), codebook usage and
perplexity (per scale for a multiscale tokenizer), and the Frechet distance between val images and
their reconstructions in the classifier's feature space.

Generation (N samples, classes balanced ``i % C``): Frechet distance, precision / recall (k = 3) and
the classifier's accuracy on the samples, against N train images of the same class mix. The real-vs-real
floor is reported beside them: val images vs train images, both with one class mix, as balanced as
the val split allows (water-filling), N of each when the val split has N; a generator cannot be
expected to beat it. Frechet distances shrink as N grows, so compare numbers of one N only. Every
number in a feature space names it ("feature_space"): the project's classifier
("tessera-emoji-classifier <hash>", a stand-in used because Inception cannot be downloaded here) or,
when its weights are present, Inception-v3 through torchmetrics ("extractor").
A Frechet distance in the classifier's space is not an FID and is never called one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipelines import metrics as M
from pipelines.checkpoint import atomic_write_text
from pipelines.classifier import EmojiClassifier
from pipelines.config import parse_overrides
from pipelines.data import DataConfig, build_image_dataset
from pipelines.loading import load_generator_dir, load_tokenizer, pick_device

logger = logging.getLogger(__name__)
PR_K = 3                      # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
LPIPS_UNAVAILABLE = "unavailable (no VGG weights)"


@dataclass
class EvalConfig:
    num_samples: int = 1000   # generated images (and real images of the reference set)
    num_steps: int = 16       # masked generator's sampling steps (AR / VAR ignore it)
    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0             # sampling seed and the seed of the reference-set draws
    batch_size: int = 64
    max_recon: int = 0        # val images to reconstruct; 0 = the whole val split

    def __post_init__(self):
        if self.num_samples < 2 * PR_K or self.batch_size < 1 or self.max_recon < 0:
            raise ValueError(f"need num_samples >= {2 * PR_K}, batch_size >= 1, max_recon >= 0; got "
                             f"{self.num_samples}, {self.batch_size}, {self.max_recon}")


class _Timer:
    """Wall-clock seconds per stage (CUDA work synchronised at the end of each)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def class_quota(class_counts: torch.Tensor, n: int) -> torch.Tensor:
    """Per-class draw sizes (C,) summing to min(n, total), as equal as the class sizes allow (water-filling:
    small classes give all they have, the rest share what is left)."""
    quota, remaining = torch.zeros_like(class_counts), min(n, int(class_counts.sum()))
    for j, c in enumerate(class_counts.argsort(stable=True).tolist()):
        quota[c] = min(int(class_counts[c]), remaining // (len(class_counts) - j))
        remaining -= int(quota[c])
    for c in (class_counts - quota).argsort(descending=True, stable=True).tolist()[:remaining]:
        quota[c] += 1      # what floor division left over (fewer than C items), to classes with room
    return quota


def draw_by_class(labels: torch.Tensor, quota: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Distinct indices with quota[c] items of each class c (capped at what the class has), shuffled."""
    picked = []
    for c, q in enumerate(quota.tolist()):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:q]])
    out = torch.cat(picked)
    return out[torch.randperm(len(out), generator=generator)].tolist()


def _labels(dataset: Dataset, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ValueError("the dataset has no .labels: cannot draw class-balanced reference images")
    labels = torch.as_tensor(labels, dtype=torch.long)
    return labels, torch.bincount(labels, minlength=num_classes)


def _batches(dataset: Dataset, indices: list[int] | None, batch_size: int):
    return DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=batch_size)


def _space_metrics(real: torch.Tensor, fake: torch.Tensor, space: str) -> dict:
    pr = M.precision_recall(real, fake, k=PR_K)
    return {"feature_space": space, "frechet_distance": M.frechet_distance_features(real, fake),
            "precision": pr.precision, "recall": pr.recall, "n_real": len(real), "n_fake": len(fake)}


@torch.no_grad()
def reconstruction_metrics(tokenizer, val: Dataset, classifier: EmojiClassifier | None, cfg: EvalConfig,
                           device: torch.device, extractor: M.Extractor | None = None) -> dict:
    """PSNR / SSIM / LPIPS / codebook stats / classifier-space FD of val images and their reconstructions."""
    multiscale = tokenizer.config.quantizer == "multiscale"
    lpips_net = M.load_lpips(device)
    fid = M.TorchmetricsFID(extractor, device, cfg.seed) if extractor else None
    n = len(val) if cfg.max_recon == 0 else min(cfg.max_recon, len(val))
    scores = {"psnr": [], "ssim": [], "lpips": []}
    counts, feats, preds, labels_all = None, {"real": [], "recon": []}, {"real": [], "recon": []}, []
    for images, labels in _batches(val, list(range(n)), cfg.batch_size):
        images = images.to(device)
        if multiscale:
            ids = tokenizer.encode_scales(images)
            recon = tokenizer.decode_scales(ids)
        else:
            ids = [tokenizer.encode(images)]
            recon = tokenizer.decode(ids[0])
        c = [M.code_counts(x, tokenizer.codebook_size) for x in ids]
        counts = c if counts is None else [a + b for a, b in zip(counts, c)]
        scores["psnr"].append(M.psnr(images, recon).cpu())
        scores["ssim"].append(M.ssim(images, recon).cpu())
        if lpips_net is not None:
            scores["lpips"].append(M.lpips_distance(lpips_net, images, recon).cpu())
        if classifier is not None:
            for key, x in (("real", images), ("recon", recon)):
                f, logits = classifier.classify(x)
                feats[key].append(f.cpu()), preds[key].append(logits.argmax(-1).cpu())
            labels_all.append(labels)
        if fid is not None:
            fid.update(images, real=True), fid.update(recon, real=False)
    out = {"num_images": n, "psnr": float(torch.cat(scores["psnr"]).mean()),
           "ssim": float(torch.cat(scores["ssim"]).mean()),
           "lpips": float(torch.cat(scores["lpips"]).mean()) if lpips_net is not None else LPIPS_UNAVAILABLE}
    stats = M.codebook_stats(sum(counts))
    out["codebook"] = {"size": tokenizer.codebook_size, "usage": stats.usage, "perplexity": stats.perplexity}
    if multiscale:
        out["codebook"]["per_scale"] = [dict(side=s, **M.codebook_stats(c)._asdict())
                                        for s, c in zip(tokenizer.scales, counts)]
    if classifier is not None:
        real, recon, labels = torch.cat(feats["real"]), torch.cat(feats["recon"]), torch.cat(labels_all)
        out["classifier"] = {"feature_space": classifier.feature_space,
                             "frechet_distance": M.frechet_distance_features(real, recon),
                             "class_accuracy_real": M.class_accuracy(torch.cat(preds["real"]), labels),
                             "class_accuracy_recon": M.class_accuracy(torch.cat(preds["recon"]), labels)}
    out["inception"] = fid.compute() if fid is not None else None
    return out


@torch.no_grad()
def _real_features(classifier, dataset, indices, cfg, device, fid=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, preds, labels_all = [], [], []
    for images, labels in _batches(dataset, indices, cfg.batch_size):
        images = images.to(device)
        if classifier is not None:
            f, logits = classifier.classify(images)
            feats.append(f.cpu()), preds.append(logits.argmax(-1).cpu())
        labels_all.append(labels)
        if fid is not None:
            fid.update(images, real=True)
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)   # noqa: E731
    return cat(feats), cat(preds), cat(labels_all)


def generation_pipeline(tokenizer, generator_dir, val: Dataset, classifier: EmojiClassifier | None, cfg: EvalConfig,
                        device: torch.device, options: dict | None = None):
    """The generator's sampling pipeline, loaded and checked against the tokenizer, the data's classes, the
    classifier and the sampling settings: every mismatch is said before any metric is computed."""
    from pipelines.generate import ClassToImagePipeline
    gen = load_generator_dir(generator_dir, device)
    pipe = ClassToImagePipeline(tokenizer, gen.model, gen.meta, device, None, generator_dir, own_generator=True)
    num_classes = gen.model.config.num_classes
    if gen.meta.get("class_names") and list(gen.meta["class_names"]) != list(val.class_names):
        raise ValueError(f"the generator was trained on classes {gen.meta['class_names']}, "
                         f"the data has {list(val.class_names)}")
    if classifier is not None and classifier.config.num_classes != num_classes:
        raise ValueError(f"the classifier has {classifier.config.num_classes} classes, the generator {num_classes}")
    pipe.check_args(cfg.num_steps, cfg.cfg_scale, cfg.temperature, cfg.top_k, cfg.top_p, cfg.batch_size, options or {})
    return pipe


@torch.no_grad()
def generation_metrics(pipe, generator_dir, train: Dataset, val: Dataset, classifier: EmojiClassifier | None,
                       cfg: EvalConfig, device: torch.device, timer: _Timer, extractor: M.Extractor | None = None,
                       options: dict | None = None) -> dict:
    """Sample N class-balanced images with ``pipe`` (``generation_pipeline``); compare them with N
    class-balanced train images (and val with train)."""
    num_classes = pipe.generator.config.num_classes
    n, g = cfg.num_samples, torch.Generator().manual_seed(cfg.seed)
    fid = M.TorchmetricsFID(extractor, device, cfg.seed) if extractor else None
    with timer("reference_features"):
        # reference: train images with the samples' class mix; floor: val vs train with one shared class mix
        train_labels, train_counts = _labels(train, num_classes)
        val_labels, val_counts = _labels(val, num_classes)
        ref_quota = torch.bincount(torch.arange(n) % num_classes, minlength=num_classes).clamp(max=train_counts)
        ref_f, _, _ = _real_features(classifier, train, draw_by_class(train_labels, ref_quota, g), cfg, device, fid)
        floor_quota = class_quota(val_counts, n).clamp(max=train_counts)
        if classifier is not None:     # the floor lives in the classifier's space
            floor_f, floor_pred, floor_labels = _real_features(
                classifier, val, draw_by_class(val_labels, floor_quota, g), cfg, device)
            floor_ref_f, _, _ = _real_features(
                classifier, train, draw_by_class(train_labels, floor_quota, g), cfg, device)
    classes = torch.arange(n) % num_classes
    sampler = torch.Generator(device=device).manual_seed(cfg.seed)
    kwargs = dict(num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, **(options or {}))
    feats, preds, sample_time = [], [], 0.0
    for i in range(0, n, cfg.batch_size):
        t0 = time.perf_counter()
        images = pipe.sample_images(classes[i:i + cfg.batch_size].to(device), sampler, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sample_time += time.perf_counter() - t0
        with timer("generation_features"):
            if classifier is not None:
                f, logits = classifier.classify(images)
                feats.append(f.cpu()), preds.append(logits.argmax(-1).cpu())
            if fid is not None:
                fid.update(images, real=False)
    timer.times["generation_sampling"] = sample_time
    out = {"generator": {"dir": str(generator_dir), "kind": pipe.generator.config.kind}, "num_samples": n,
           "settings": {k: v for k, v in kwargs.items()}, "images_per_s": n / max(sample_time, 1e-9),
           "reference": f"{int(ref_quota.sum())} train images, per class {ref_quota.tolist()}"}
    if classifier is not None:
        with timer("generation_metrics"):
            fake = torch.cat(feats)
            out["classifier"] = dict(_space_metrics(ref_f, fake, classifier.feature_space),
                                     class_accuracy=M.class_accuracy(torch.cat(preds), classes))
            out["real_floor"] = dict(_space_metrics(floor_ref_f, floor_f, classifier.feature_space),
                                     class_accuracy=M.class_accuracy(floor_pred, floor_labels),
                                     what=f"val vs train images, per class {floor_quota.tolist()} each")
    out["inception"] = fid.compute() if fid is not None else None
    return out


def evaluate(tokenizer_dir, data: str = "emoji", generator_dir=None, classifier_dir=None,
             config: EvalConfig | None = None, device=None, extractor: M.Extractor | None | str = "auto",
             options: dict | None = None) -> dict:
    """Run every stage; return the results dict (what ``--out`` writes).

    ``extractor``: "auto" = Inception-v3 when torch-fidelity and its weights are here, None = off, or an
    ``Extractor`` (tests inject a stub; its name labels its numbers).
    """
    cfg, device = config or EvalConfig(), pick_device(device)
    timer = _Timer(device)
    with timer("load"):
        tokenizer = load_tokenizer(tokenizer_dir, device)
        classifier = EmojiClassifier.from_pretrained(classifier_dir, device) if classifier_dir else None
        data_cfg = DataConfig(dataset=data, resolution=tokenizer.config.resolution, hflip=False)
        val = build_image_dataset(data_cfg, "val")
        reason = "disabled (--no-inception)"
        if extractor == "auto":
            extractor, reason = M.load_inception()
        if classifier is not None and classifier.config.class_names and \
                list(classifier.config.class_names) != list(val.class_names):
            raise ValueError(f"the classifier was trained on classes {list(classifier.config.class_names)}, "
                             f"the data has {list(val.class_names)}")
        pipe = None if generator_dir is None else generation_pipeline(tokenizer, generator_dir, val, classifier, cfg,
                                                                      device, options)
    results = {"tokenizer": {"dir": str(tokenizer_dir), "hash": tokenizer.fingerprint(),
                             "grid_size": tokenizer.grid_size, "scales": list(getattr(tokenizer, "scales", ()))},
               "data": {"dataset": data, "resolution": data_cfg.resolution, "num_val": len(val)},
               "config": asdict(cfg), "device": str(device),
               "classifier": {"dir": str(classifier_dir), "feature_space": classifier.feature_space}
               if classifier else "not given (no classifier-space metrics)",
               "inception": extractor.name if extractor else f"unavailable: {reason}"}
    with timer("reconstruction"):
        results["reconstruction"] = reconstruction_metrics(tokenizer, val, classifier, cfg, device, extractor)
    if generator_dir is not None:
        train = build_image_dataset(data_cfg, "train")
        results["data"]["num_train"] = len(train)
        results["generation"] = generation_metrics(pipe, generator_dir, train, val, classifier, cfg, device, timer,
                                                   extractor, options)
    results["timings_s"] = {k: round(v, 3) for k, v in timer.times.items()}
    return _finite(results)


def _finite(x):
    """JSON-safe: non-finite floats (e.g. PSNR of a perfect reconstruction) become None."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# ---- table and CLI -------------------------------------------------------------------------------
def _num(x, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def format_table(results: dict) -> str:
    """The results as a plain-text table for people."""
    rec = results["reconstruction"]
    lines = [f"reconstruction ({rec['num_images']} val images)",
             f"  PSNR             {_num(rec['psnr'], '.2f')} dB",
             f"  SSIM             {_num(rec['ssim'])}",
             f"  LPIPS            {_num(rec['lpips'])}",
             f"  codebook         usage {_num(rec['codebook']['usage'], '.3f')}, "
             f"perplexity {_num(rec['codebook']['perplexity'], '.1f')} of {rec['codebook']['size']}"]
    for s in rec["codebook"].get("per_scale", []):
        lines.append(f"    scale {s['side']:>3}      usage {s['usage']:.3f}, perplexity {s['perplexity']:.1f}")
    if "classifier" in rec:
        c = rec["classifier"]
        lines += [f"  FD (recon)       {_num(c['frechet_distance'])}   [{c['feature_space']}]",
                  f"  class accuracy   {_num(c['class_accuracy_recon'])} recon / {_num(c['class_accuracy_real'])} real"]
    if rec.get("inception"):
        lines.append(f"  rFID             {_num(rec['inception']['fid'])}   [{rec['inception']['extractor']}]")
    gen = results.get("generation")
    if gen:
        lines += ["", f"generation ({gen['num_samples']} samples, {gen['generator']['kind']}, "
                      f"{_num(gen['images_per_s'], '.1f')} images/s; reference: {gen['reference']})"]
        if "classifier" in gen:
            c, f = gen["classifier"], gen["real_floor"]
            lines.append(f"                   samples    real floor   [{c['feature_space']}]")
            for key, label in (("frechet_distance", "FD"), ("precision", "precision"), ("recall", "recall"),
                               ("class_accuracy", "class accuracy")):
                lines.append(f"  {label:<15}  {_num(c[key]):>8}   {_num(f[key]):>8}")
        if gen.get("inception"):
            i = gen["inception"]
            lines.append(f"  FID              {_num(i['fid'])}   [{i['extractor']}]")
            if "inception_score" in i:
                lines.append(f"  IS               {_num(i['inception_score'], '.3f')} +- "
                             f"{_num(i['inception_score_std'], '.3f')}   [{i['extractor']}]")
    if results["inception"].startswith("unavailable"):
        lines.append(f"Inception FID/IS: {results['inception']}")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()))
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="reconstruction and generation metrics (table + JSON)",
                       description="Evaluate a tokenizer (val-split reconstructions) and optionally a generator "
                                   "(class-balanced samples) in the classifier's feature space, and with "
                                   "Inception-v3 when its weights are present.")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--generator", metavar="DIR", help="also evaluate samples of this generator")
    p.add_argument("--classifier", metavar="DIR", help="feature space for FD / precision / recall / accuracy "
                                                        "(tessera train-classifier)")
    p.add_argument("--data", default="emoji", help="'emoji' or an image folder (class per subfolder)")
    p.add_argument("--num-samples", type=int, default=1000, metavar="N")
    p.add_argument("--num-steps", type=int, default=16, help="masked: sampling steps (AR/VAR ignore it)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance; 1 = off")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-recon", type=int, default=0, metavar="N", help="val images to reconstruct (0 = all)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a family's sampler option")
    p.add_argument("--no-inception", action="store_true", help="skip Inception FID/IS even if its weights exist")
    p.add_argument("--device", default=None)
    p.add_argument("--out", metavar="JSON", help="write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(num_samples=args.num_samples, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     batch_size=args.batch_size, max_recon=args.max_recon)
    options = parse_overrides(args.option)
    if any(isinstance(v, dict) for v in options.values()):
        raise ValueError("--option takes KEY=VALUE with a plain key (no dots)")
    results = evaluate(args.tokenizer, args.data, args.generator, args.classifier, cfg, args.device,
                       None if args.no_inception else "auto", options)
    print(format_table(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.out}")
    return 0
