"""``tessera demo``: what tessera does, in a couple of minutes, on the shipped demo weights.

Writes to ``outputs/demo/``: a reconstruction strip from the tokenizer, a class-conditional grid for
each generator family present (masked at 16 steps, AR, VAR), and inpainting before/after strips
(box and brush masks on val emoji). Runs on the GPU when there is one, else the CPU.

Without shipped weights (a checkout whose ``checkpoints/`` has no models yet) it falls back to the
foundation demo: train the tiny tokenizer for ``--train-seconds`` on the CPU and write reconstructions.
"""
from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipelines.data import DataConfig, build_image_dataset
from pipelines.images import image_to_tensor, tensor_to_pil

logger = logging.getLogger(__name__)

FAMILIES = (("masked", "tokenizer", {"num_steps": 16}), ("ar", "tokenizer", {}), ("var", "msvq", {}))
VIEW = 64   # images are shown at least this large (nearest-neighbour upscaling keeps the pixels honest)


def _view(image: Image.Image) -> Image.Image:
    scale = max(1, VIEW // image.width)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _strip(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """Rows of equally sized images -> one white-padded grid."""
    rows = [[_view(im) for im in row] for row in rows]
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def brush_mask(size: int, seed: int) -> Image.Image:
    """A deterministic free-form brush mask (white = regenerate): a few thick random strokes."""
    g = torch.Generator().manual_seed(seed)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = max(2, size // 8)
    for _ in range(3):
        pts = (torch.rand(4, 2, generator=g) * 0.6 + 0.2) * size
        draw.line([tuple(p) for p in pts.tolist()], fill=255, width=width, joint="curve")
    return mask


@functools.lru_cache(maxsize=2)
def _val_split(resolution: int):
    """The emoji val split, loaded once per resolution (reconstruction and inpainting both draw from it)."""
    return build_image_dataset(DataConfig(dataset="emoji", resolution=resolution, hflip=False), "val")


def val_examples(resolution: int, count: int) -> list[tuple[Image.Image, int]]:
    """``count`` val emoji spread over the classes (deterministic)."""
    dataset = _val_split(resolution)
    labels = dataset.labels
    picks, per_class = [], {}
    for i in range(len(dataset)):
        c = int(labels[i])
        if per_class.get(c, 0) < 1 + count // len(dataset.class_names):
            per_class[c] = per_class.get(c, 0) + 1
            picks.append(i)
        if len(picks) == count:
            break
    return [(tensor_to_pil(dataset[i][0][None])[0], int(labels[i])) for i in picks]


SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


def shipped(checkpoints: Path) -> dict[str, Path]:
    """Model dirs present under ``checkpoints`` (each has config.json + model.safetensors)."""
    return {p.name: p for p in sorted(checkpoints.iterdir()) if (p / "config.json").is_file()
            and (p / "model.safetensors").is_file()} if checkpoints.is_dir() else {}


def full_demo(models: dict[str, Path], out: Path, device: str | None, per_class: int, seed: int) -> list[str]:
    from pipelines.generate import ClassToImagePipeline, class_grid
    from pipelines.inpaint import InpaintPipeline
    from pipelines.loading import load_tokenizer
    lines = []
    stages = ["reconstruction"] + [f for f, tok, _ in FAMILIES if f in models and tok in models] + ["inpainting"]
    bar = tqdm(stages, desc="demo", unit="stage")
    for stage in bar:
        bar.set_postfix_str(stage)
        t0 = time.perf_counter()
        if stage == "reconstruction":
            tok = load_tokenizer(models["tokenizer"], device)
            examples = val_examples(tok.config.resolution, 12)
            x = torch.stack([image_to_tensor(im, tok.config.resolution) for im, _ in examples]).to(tok.last_layer.device)
            with torch.no_grad():
                recon = tok.decode(tok.encode(x))
            psnr = 10 * torch.log10(4 / ((recon - x) ** 2).mean(dim=(1, 2, 3))).mean().item()
            path = out / "reconstruction.png"
            _strip([[im for im, _ in examples], tensor_to_pil(recon)]).save(path)
            lines.append(f"reconstruction  {path}  (top: val emoji, bottom: decoded from {tok.grid_size}x"
                         f"{tok.grid_size} tokens; PSNR {psnr:.1f} dB)  {time.perf_counter() - t0:.1f} s")
        elif stage == "inpainting":
            if "masked" not in models:
                continue
            pipe = InpaintPipeline.from_pretrained(models["tokenizer"], models["masked"], device)
            res = pipe.tokenizer.config.resolution
            rows = []
            for k, (image, label) in enumerate(val_examples(res, 4)):
                box = (res // 4, res // 4, 3 * res // 4, 3 * res // 4)
                mask = box if k % 2 == 0 else brush_mask(res, seed + k)
                shown = Image.new("L", (res, res), 0)
                if isinstance(mask, tuple):
                    ImageDraw.Draw(shown).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
                else:
                    shown = mask
                holed = Image.composite(Image.new("RGB", (res, res), (128, 128, 128)), image, shown)
                outs = pipe(image, mask, class_label=label, num_steps=16, seed=seed + k, num_samples=3)
                rows.append([image, holed] + outs)
            path = out / "inpainting.png"
            _strip(rows).save(path)
            lines.append(f"inpainting      {path}  (input, masked input, 3 samples; box and brush masks)  "
                         f"{time.perf_counter() - t0:.1f} s")
        else:
            family, tok_name, options = next(f for f in FAMILIES if f[0] == stage)
            pipe = ClassToImagePipeline.from_pretrained(models[tok_name], models[family], device)
            names = pipe.class_names
            classes = [c for c in range(len(names)) for _ in range(per_class)]
            images = pipe(classes, seed=seed, **options)
            path = out / f"samples-{family}.png"
            class_grid([_view(im) for im in images], names, per_class).save(path)
            lines.append(f"samples {family:<7} {path}  ({len(names)} classes x {per_class}"
                         f"{', 16 steps' if family == 'masked' else ''})  {time.perf_counter() - t0:.1f} s")
    return lines


def quick_demo(out: Path, seconds: int, device: str | None) -> list[str]:
    """No shipped weights: train the tiny tokenizer for ``seconds`` and write reconstructions."""
    from pipelines.train_tokenizer import run_train
    t0 = time.perf_counter()
    run_dir = out / "tiny-tokenizer"
    resume = (run_dir / "checkpoints").is_dir()
    status = run_train(argparse.Namespace(
        config=Path(__file__).resolve().parent.parent / "configs/tokenizer/tiny.yaml", output=run_dir,
        resume=resume, max_steps=100000, checkpoint_every=None,
        set=[f"train.max_minutes={seconds / 60}", "train.log_every=50"]))
    if status:              # a signal (Ctrl-C) stopped the training: stop the demo too; a rerun resumes it
        raise SystemExit(status)
    return full_demo({"tokenizer": run_dir}, out, device, 0, 0)[:1] + [
        f"trained the tiny tokenizer for {time.perf_counter() - t0:.0f} s at {run_dir} (no shipped weights found)"]


def run(args: argparse.Namespace) -> int:
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.checkpoints is not None and not Path(args.checkpoints).is_dir():     # a mistyped folder: no silent fallback
        raise FileNotFoundError(f"checkpoints folder not found: {args.checkpoints}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = shipped(Path(args.checkpoints) if args.checkpoints is not None else SHIPPED)
    if "tokenizer" in models:
        lines = full_demo(models, out, args.device, args.per_class, args.seed)
    else:
        lines = quick_demo(out, args.train_seconds, args.device)
    print("\n".join(lines))
    print(f"demo written to {out}/ in {time.perf_counter() - t0:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="samples, inpainting and reconstructions from the shipped demo weights",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default=None,
                   help="folder of model dirs (tokenizer, msvq, masked, ar, var); default: the checkout's "
                        "checkpoints/, and without it the tiny tokenizer is trained")
    p.add_argument("--out", default="outputs/demo", help="where the PNGs go")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class in each family's grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seconds", type=int, default=60,
                   help="without shipped weights: how long to train the tiny tokenizer")
    p.set_defaults(func=run)
