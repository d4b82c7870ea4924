"""Class labels -> images: ``ClassToImagePipeline`` (any generator family + its tokenizer) and
``tessera generate``, which writes a grid with one labelled row per class. ``TokenPipeline`` holds
what the image pipelines share (loading, checks, one batch of sampling + decoding; inpaint.py uses it).

Sampling runs in bf16 autocast on a GPU, from a ``torch.Generator`` on the device seeded with
``seed``: the same seed (and batch size) gives the same images. VAR samples a token pyramid with the
tokenizer as its codec and decodes it with ``decode_scales``; masked and AR decode a grid with ``decode``.
The family option ``compile=true`` compiles the generator's sampler and, on a GPU, the tokenizer's decoder
(``compile_decoder``).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import numbers
import re
import time
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from generator.base import CompiledOrEager, Generator
from generator.launch import prefer_static_matmul_schedules
from pipelines.config import coerce, parse_overrides
from pipelines.images import output_targets, tensor_to_pil
from pipelines.loading import (check_compatible, class_names_for, load_generator_dir, load_tokenizer, pick_device,
                               read_generator_config, resolve_classes)

logger = logging.getLogger(__name__)

# sample() arguments the pipeline sets itself; everything else a family's sample() names is a family option
_OWN = {"self", "classes", "num_steps", "temperature", "top_k", "top_p", "cfg_scale", "generator", "codec",
        "known_ids", "known_mask", "batch_size"}


def family_options(generator: Generator) -> list[str]:
    """Extra keyword options the generator's sampler takes (e.g. masked: sampler, choice_temperature)."""
    params = inspect.signature(generator.sample).parameters.values()
    return sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _OWN)


def compile_decoder(tokenizer) -> None:
    """Faster decoding: the decoder's convolutions in channels_last (NHWC on tensor cores) and its
    forward through torch.compile (H100, bf16, batch 64, f16 decoder: 1,123 images/s vs 443 eager,
    benchmarks/tokenizer.py). Once per tokenizer; the first decode of a batch size compiles, and a
    compile failure falls back to the eager decoder with a warning. Weights and outputs are unchanged
    (compiled kernels may round differently in the last bits)."""
    decoder = tokenizer.decoder
    if isinstance(vars(decoder).get("forward"), CompiledOrEager):
        return
    decoder.to(memory_format=torch.channels_last)
    tokenizer.post_quant_conv.to(memory_format=torch.channels_last)
    eager = decoder.forward
    decoder.forward = CompiledOrEager(eager, eager, "tokenizer's decoder", logger, "decoding eagerly")


class TokenPipeline:
    """A tokenizer and a generator trained on its tokens, checked to fit and frozen on one device:
    what every image pipeline shares (loading, argument checks, sampling + decoding one batch)."""

    def __init__(self, tokenizer, generator: Generator, meta: dict[str, Any] | None = None,
                 device: str | torch.device | None = None, tokenizer_dir=None, generator_dir=None,
                 own_generator: bool = False):
        """``own_generator``: the generator was loaded for this pipeline alone, so on a GPU its Linear
        weights may be stored in bf16 (``Generator.autocast_weights``: the same outputs under the
        pipeline's autocast, less work per step). A caller's model (e.g. the one being trained) is left as is."""
        check_compatible(tokenizer, generator, meta, generator_dir, tokenizer_dir)
        self.device = pick_device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.generator = generator.to(self.device).eval()
        if own_generator and self.device.type == "cuda":
            self.generator.autocast_weights(torch.bfloat16)
        self.class_names = class_names_for(generator, meta)

    @classmethod
    def from_pretrained(cls, tokenizer_dir: str | Path, generator_dir: str | Path,
                        device: str | torch.device | None = None) -> "TokenPipeline":
        device = pick_device(device)
        gen = load_generator_dir(generator_dir, device)
        tokenizer = load_tokenizer(tokenizer_dir, device)
        return cls(tokenizer, gen.model, gen.meta, device, tokenizer_dir, generator_dir, own_generator=True)

    def check_args(self, num_steps: int, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                   batch_size: int, options: dict[str, Any]) -> None:
        """ValueError for any bad argument, before any sampling starts."""
        Generator.check_sampling_args(num_steps, temperature, top_k, top_p, cfg_scale)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        valid = family_options(self.generator)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown option '{unknown[0]}' for the {self.generator.config.kind} generator; "
                             f"valid options: {', '.join(valid) or '(none)'}")
        hints = typing.get_type_hints(type(self.generator).sample)
        for name, value in options.items():      # the type the sampler's signature names, e.g. float
            coerce(value, hints.get(name, Any), f"option '{name}'")

    def torch_generator(self, seed: int) -> torch.Generator:
        """A ``torch.Generator`` on the pipeline's device seeded with ``seed`` (any integer torch takes)."""
        if not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        return torch.Generator(device=self.device).manual_seed(int(seed))

    @torch.no_grad()
    def sample_images(self, classes_B: torch.Tensor | None, generator: torch.Generator, **kwargs) -> torch.Tensor:
        """One batch: class ids (B,) (None: unconditional, B from ``batch_size`` / ``known_ids`` in
        ``kwargs``) -> images (B, 3, H, W) float32 in [-1, 1]. ``kwargs`` go to the generator's sample()."""
        on_gpu = self.device.type == "cuda"
        if on_gpu and kwargs.get("compile"):
            compile_decoder(self.tokenizer)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_gpu):
            if self.generator.config.kind == "var":
                ids_list = self.generator.sample(classes_B, codec=self.tokenizer, generator=generator, **kwargs)
                images = self.tokenizer.decode_scales(ids_list)
            else:
                images = self.tokenizer.decode(self.generator.sample(classes_B, generator=generator, **kwargs))
        return images.float()


class ClassToImagePipeline(TokenPipeline):
    """``pipe(classes=[...])`` -> PIL images, one per class label."""

    def __call__(self, classes: Sequence[int | str], num_steps: int = 16, cfg_scale: float = 2.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                 **options) -> list[Image.Image]:
        """Class ids or names (one image each) -> PIL images, in order. ``options`` go to the family's
        sampler (``family_options``); num_steps is the masked generator's step count (AR: one token per
        step, VAR: one scale per step, both ignore it)."""
        self.check_args(num_steps, cfg_scale, temperature, top_k, top_p, batch_size, options)
        ids = resolve_classes(list(classes), self.class_names)
        generator = self.torch_generator(seed)
        kwargs = dict(num_steps=num_steps, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                      top_p=top_p, **options)
        out: list[Image.Image] = []
        for i in range(0, len(ids), batch_size):
            classes_B = torch.tensor(ids[i:i + batch_size], dtype=torch.long, device=self.device)
            out += tensor_to_pil(self.sample_images(classes_B, generator, **kwargs))
        return out


def class_grid(images: Sequence[Image.Image], row_labels: Sequence[str], per_row: int, pad: int = 2) -> Image.Image:
    """Images (row-major, ``per_row`` a row) -> one RGB grid with each row's label in a strip on the left."""
    if len(images) != len(row_labels) * per_row:
        raise ValueError(f"{len(images)} images do not fill {len(row_labels)} rows of {per_row}")
    w, h = images[0].size
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(label, font=font)) for label in row_labels) + 2 * pad + 4
    grid = Image.new("RGB", (label_w + per_row * (w + pad) + pad, len(row_labels) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(row_labels):
        y = pad + r * (h + pad)
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((pad + 2, y + (h - (box[3] - box[1])) // 2 - box[1]), label, fill="black", font=font)
        for c in range(per_row):
            grid.paste(images[r * per_row + c].convert("RGB"), (label_w + pad + c * (w + pad), y))
    return grid


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


# ---- CLI ---------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """--tokenizer, --generator: shared by the sampling commands (generate, inpaint)."""
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer dir (config.json + model.safetensors)")
    p.add_argument("--generator", required=True, metavar="DIR", help="generator dir written by train-generator")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--num-steps .. --device: shared by the sampling commands; read them back with ``sampling_options``."""
    p.add_argument("--num-steps", type=int, default=16, metavar="N", help="masked: sampling steps (AR/VAR ignore it)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance; 1 = off")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a family's sampler option, e.g. sampler=ancestral (masked); repeatable")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """Check the sampling flags (before any model is loaded); --option KEY=VALUE -> the family options dict."""
    Generator.check_sampling_args(args.num_steps, args.temperature, args.top_k, args.top_p, args.cfg_scale)
    options = parse_overrides(args.option)
    if any(isinstance(v, dict) for v in options.values()):
        raise ValueError("--option takes KEY=VALUE with a plain key (no dots)")
    return options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="class labels -> images (a labelled grid, one row per class)",
                       description="Generate images of the given classes with a trained generator and its tokenizer.")
    add_model_args(p)
    p.add_argument("--classes", required=True, nargs="+", metavar="CLASS",
                   help="class ids or names (quote names with spaces)")
    p.add_argument("--num-per-class", type=int, default=4, metavar="N", help="images per class (a grid row)")
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", metavar="PNG", help="the grid image to write")
    p.add_argument("--out-dir", metavar="DIR", help="also write every image as its own PNG here")
    p.set_defaults(func=run)


def static_matmuls_for(generator_dir: str | Path) -> dict[str, str]:
    """The sampling commands' process setting, made before their first matmul: cuBLAS without a workspace for a
    masked generator (``prefer_static_matmul_schedules``: -1.3 ms per masked-B call on an H100, the same ids;
    AR and VAR sampling, unmeasured that way, keep PyTorch's default). Returns the variables set."""
    return prefer_static_matmul_schedules() if read_generator_config(generator_dir).kind == "masked" else {}


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out_dir = output_targets(args.out, args.out_dir, "the grid")
    if args.num_per_class < 1:
        raise ValueError(f"--num-per-class must be >= 1, got {args.num_per_class}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = sampling_options(args)
    static_matmuls_for(args.generator)
    pipe = ClassToImagePipeline.from_pretrained(args.tokenizer, args.generator, args.device)
    ids = resolve_classes(args.classes, pipe.class_names)
    images = pipe([c for c in ids for _ in range(args.num_per_class)], num_steps=args.num_steps,
                  cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, batch_size=args.batch_size, **options)
    names = [pipe.class_names[c] for c in ids]
    written = []
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        class_grid(images, names, args.num_per_class).save(out)
        written.append(f"{out} ({len(ids)} {'class' if len(ids) == 1 else 'classes'} x {args.num_per_class})")
    if out_dir is not None:
        for i, image in enumerate(images):
            r, c = divmod(i, args.num_per_class)
            image.save(out_dir / f"{r:03d}-{_slug(names[r])}-{c:02d}.png")
        written.append(f"{len(images)} images in {out_dir}/")
    print(f"wrote {' and '.join(written)} in {time.perf_counter() - t0:.1f} s "
          f"({pipe.generator.config.kind} generator on {pipe.device})")
    return 0
