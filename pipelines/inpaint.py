"""Image + pixel mask -> images: ``InpaintPipeline`` (any generator family + its tokenizer) and
``tessera inpaint``, which writes the output or a grid (input, mask, outputs).

The image is encoded to token ids; a token is unknown if any pixel of its patch is masked (grown by
``dilate`` tokens); the generator fills only the unknown tokens and never changes a known one (the one
rule of generator/sampling.py ``keep_known``); the tokenizer decodes, and the input's pixels are pasted
back so everything outside the mask is the (resized) input exactly, with an optional feathered seam
that stays inside the mask (DESIGN "Inpainting"). Per family:

- masked: native; known tokens start unmasked and every step sees the context on all sides of a hole.
- var: zero-shot editing as in the VAR paper: the image's own token pyramid (``encode_scales``) is
  teacher-forced at every scale, wherever a token of that scale overlaps no unknown finest-grid token
  (``scale_masks``); the other tokens of each scale are sampled. A hole makes the coarsest scales unknown.
- ar: raster order with the known tokens forced wherever they occur. AR conditions only on the tokens
  *before* a position, so the context after a hole (to its right on the same rows, and below it) is
  unseen while the hole is filled: expect seams at a hole's lower edge; use masked when that matters.

Known tokens are encoded from the whole input (the hole's old content included), like MaskGIT's editing.
Letters: B samples, R resolution (pixels), h w token grid, s side of a VAR scale.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from pipelines.generate import (TokenPipeline, add_model_args, add_sampling_args, class_grid, sampling_options,
                                static_matmuls_for)
from pipelines.images import (image_to_tensor, mask_to_tensor, open_image, output_targets, paste, scale_masks,
                              tensor_to_pil, token_mask)
from pipelines.loading import resolve_classes

logger = logging.getLogger(__name__)


class InpaintInputs(NamedTuple):
    image_3RR: torch.Tensor     # float in [-1, 1]: the input as RGB, resized (shorter side) + centre-cropped
    mask_RR: torch.Tensor       # bool, True = regenerate; the same resize + crop as the image


class InpaintPipeline(TokenPipeline):
    """``pipe(image, mask)`` -> PIL images (of the tokenizer's resolution) with the masked region regenerated."""

    def prepare(self, image: Image.Image | str | Path, mask) -> InpaintInputs:
        """Open, convert and resize the image and its mask. ``image``: a path or a PIL image of any mode
        (RGBA / palette / greyscale / 16-bit via images.to_rgb); ``mask``: a path, PIL image or array the
        size of the image (white / > 0.5 = regenerate) or a box ``(x0, y0, x1, y1)`` in image pixels.
        ValueError / FileNotFoundError for an unreadable file, a mask of another size, a box outside."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        resolution = self.tokenizer.config.resolution
        return InpaintInputs(image_to_tensor(image, resolution), mask_to_tensor(mask, image.size, resolution))

    @torch.no_grad()
    def known_tokens(self, image_13RR: torch.Tensor, unknown_1hw: torch.Tensor, n: int) -> tuple:
        """The image's tokens and where they are known (True = keep), repeated for ``n`` samples:
        masked / AR: (n, h, w) long and bool; VAR: lists of (n, s, s) per scale, coarse -> fine."""
        image_13RR, unknown_1hw = image_13RR.to(self.device), unknown_1hw.to(self.device)
        if self.generator.config.kind == "var":
            ids_list = self.tokenizer.encode_scales(image_13RR)
            known_list = [~unknown for unknown in scale_masks(unknown_1hw, self.tokenizer.scales)]
            return [ids.repeat(n, 1, 1) for ids in ids_list], [known.repeat(n, 1, 1) for known in known_list]
        return self.tokenizer.encode(image_13RR).repeat(n, 1, 1), (~unknown_1hw).repeat(n, 1, 1)

    def __call__(self, image: Image.Image | str | Path, mask, class_label: int | str | None = None,
                 num_steps: int = 16, cfg_scale: float = 2.0, seed: int = 0, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, dilate: int = 0, feather: int = 0,
                 **options) -> list[Image.Image]:
        """Regenerate the masked region of ``image`` (see ``prepare``) ``num_samples`` times -> RGB PIL
        images of the tokenizer's resolution; outside the mask they equal the resized input bit for bit.

        class_label: an id or a name, or None for unconditional (the null class; cfg_scale has nothing to
        guide and is not applied). dilate: grow the unknown token region by this many tokens. feather:
        blend the generated pixels in over this many pixels inside the mask's edge. ``options`` go to
        the family's sampler (``family_options``). The samples are distinct draws from one
        ``torch.Generator`` seeded with ``seed``: same seed, same images. An empty mask returns the
        resized input (with a warning, nothing sampled); a fully masked image is plain generation.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for name, value in (("dilate", dilate), ("feather", feather)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.check_args(num_steps, cfg_scale, temperature, top_k, top_p, num_samples, options)
        classes = None if class_label is None else resolve_classes([class_label], self.class_names)
        inputs = self.prepare(image, mask)
        image_B3RR = inputs.image_3RR[None].expand(num_samples, -1, -1, -1)
        if not inputs.mask_RR.any():
            logger.warning("the mask is empty: nothing to inpaint, returning the input")
            return tensor_to_pil(image_B3RR)
        unknown_1hw = token_mask(inputs.mask_RR[None], self.tokenizer.grid_size, dilate)
        known_ids, known_mask = self.known_tokens(inputs.image_3RR[None], unknown_1hw, num_samples)
        classes_B = None if classes is None else torch.full((num_samples,), classes[0], device=self.device)
        generator = self.torch_generator(seed)
        generated_B3RR = self.sample_images(
            classes_B, generator, num_steps=num_steps, cfg_scale=cfg_scale if classes is not None else 1.0,
            temperature=temperature, top_k=top_k, top_p=top_p, known_ids=known_ids, known_mask=known_mask,
            batch_size=num_samples, **options)
        mask_BRR = inputs.mask_RR[None].expand(num_samples, -1, -1)
        return tensor_to_pil(paste(image_B3RR, generated_B3RR, mask_BRR, feather))


def mask_overlay(inputs: InpaintInputs) -> Image.Image:
    """The mask drawn on the input, for people: regenerated pixels white, kept pixels dimmed."""
    dimmed_3RR = (inputs.image_3RR + 1) * 0.4 - 1
    return tensor_to_pil(torch.where(inputs.mask_RR, torch.ones_like(dimmed_3RR), dimmed_3RR)[None])[0]


# ---- CLI ---------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inpaint", help="image + mask -> images with the masked region regenerated",
                       description="Regenerate the masked region of an image with a trained generator (any "
                                   "family) and its tokenizer; pixels outside the mask are kept exactly.")
    add_model_args(p)
    p.add_argument("--image", required=True, metavar="PNG", help="input image (resized + centre-cropped to the "
                                                                 "tokenizer's resolution)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", metavar="PNG", help="mask the size of the image: white (and opaque) = regenerate; "
                                                     "the output is the image's centre square")
    where.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                       help="regenerate this box (image pixels, x1 y1 exclusive; inside the centre square the "
                            "output covers)")
    p.add_argument("--class", dest="class_label", metavar="ID|NAME", help="class id or name (default: unconditional)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="> 1: a grid of input, mask, samples")
    add_sampling_args(p)
    p.add_argument("--dilate", type=int, default=0, metavar="N", help="grow the unknown token region by N tokens")
    p.add_argument("--feather", type=int, default=0, metavar="PX", help="blend the seam over PX pixels inside the mask")
    p.add_argument("--out", metavar="PNG", help="the output (one sample) or the grid (several) to write")
    p.add_argument("--out-dir", metavar="DIR", help="also write every sample as its own PNG here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out_dir = output_targets(args.out, args.out_dir, "one sample, or the grid of several")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--dilate", args.dilate, 0),
                             ("--feather", args.feather, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    options = sampling_options(args)
    image = open_image(args.image)          # a bad image fails before any model is loaded
    mask = args.mask if args.mask is not None else tuple(args.box)
    static_matmuls_for(args.generator)
    pipe = InpaintPipeline.from_pretrained(args.tokenizer, args.generator, args.device)
    inputs = pipe.prepare(image, mask)
    images = pipe(image, mask, args.class_label, num_steps=args.num_steps, cfg_scale=args.cfg_scale, seed=args.seed,
                  num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  dilate=args.dilate, feather=args.feather, **options)
    written = []
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if len(images) == 1:
            images[0].save(out)
            written.append(str(out))
        else:
            label = ("unconditional" if args.class_label is None
                     else pipe.class_names[resolve_classes([args.class_label], pipe.class_names)[0]])
            class_grid([tensor_to_pil(inputs.image_3RR[None])[0], mask_overlay(inputs), *images], [label],
                       len(images) + 2).save(out)
            written.append(f"{out} (input, mask, {len(images)} samples)")
    if out_dir is not None:
        for i, image_i in enumerate(images):
            image_i.save(out_dir / f"inpaint-{i:02d}.png")
        written.append(f"{len(images)} images in {out_dir}/")
    print(f"wrote {' and '.join(written)} in {time.perf_counter() - t0:.1f} s "
          f"({pipe.generator.config.kind} generator on {pipe.device})")
    return 0
