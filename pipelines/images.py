"""Images and masks at the pipeline boundary: open any file safely, convert, resize, validate.

Every user-supplied image passes through here, so the rules live in one place: a pixel limit
against decompression bombs, any PIL mode converted to RGB (alpha composited on white, 16-bit
scaled), resize of the shorter side + centre crop, and one-line errors that name the file.
"""
from __future__ import annotations

import logging
import math
import numbers
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

MAX_PIXELS = 8192 * 8192        # refuse larger images (PIL's bomb check fires at 2x its limit)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
logger = logging.getLogger(__name__)


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file; errors name the file (as ``what``: "image", "mask") and the reason."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return ImageOps.exif_transpose(im)      # as viewers show it (a phone JPEG's orientation tag)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path} is too large: more than {MAX_PIXELS} pixels (decompression bomb guard)") from None
    except PermissionError:
        raise ValueError(f"{path} cannot be read: permission denied") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path} could not be decoded ({e}); is the file truncated or corrupt?") from None


def output_image_path(path: str | Path) -> Path:
    """``path`` if an image can be written there: not a directory, and an extension PIL can save
    (.png, .jpg, .webp ...). Commands check their output first, so a bad name fails before any work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give an image file name such as {path / 'out.png'}")
    Image.init()
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"cannot write an image to {path}: unknown image extension '{path.suffix}' "
                         "(use .png, .jpg, .webp ...)")
    return path


def output_dir_path(path: str | Path) -> Path:
    """``path`` as a directory for single images, made now (a file there fails before any work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out-dir {path} is a file, not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_targets(out: str | None, out_dir: str | None, out_holds: str) -> Path | None:
    """A command's ``--out`` and ``--out-dir`` checked before any work: at least one given, ``--out`` a name an image
    can be written to (``out_holds``: what it will hold), ``--out-dir`` made now. Returns the directory or None."""
    if not out and not out_dir:
        raise ValueError(f"give --out PNG ({out_holds}) and/or --out-dir DIR (one PNG per sample)")
    if out:
        output_image_path(out)         # a bad name fails now, not after the sampling
    return output_dir_path(out_dir) if out_dir else None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha (RGBA, LA, palette with transparency) composited on white,
    16/32-bit greyscale scaled to 8 bits, CMYK/YCbCr/L converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)   # "F" pixels may be nan / inf
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The centre square (left, top, right, bottom) of a width x height image, in source pixels."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def resize_center_crop(image: Image.Image, resolution: int, resample=Image.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``resolution`` then crop the centre square (as ``ImageOps.fit``)."""
    return image.resize((resolution, resolution), resample, box=center_square(*image.size))


def any_in_cells(arr_HW: np.ndarray, resolution: int) -> np.ndarray:
    """bool (R, R): whether any nonzero source pixel overlaps each pixel of the centre square resized to
    R x R (the cells ``resize_center_crop`` maps onto each output pixel), however small the overlap."""
    height, width = arr_HW.shape
    left, top, right, bottom = center_square(width, height)
    steps = np.arange(resolution + 1) / resolution

    def spans(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        edges = lo + (hi - lo) * steps
        first = np.floor(edges[:-1]).astype(np.int64)
        return first, np.maximum(np.ceil(edges[1:]).astype(np.int64), first + 1)

    (y0, y1), (x0, x1) = spans(top, bottom), spans(left, right)
    total = np.zeros((height + 1, width + 1), dtype=np.int64)
    total[1:, 1:] = (arr_HW != 0).cumsum(0).cumsum(1)          # summed-area table
    count = total[y1][:, x1] - total[y0][:, x1] - total[y1][:, x0] + total[y0][:, x0]
    return count > 0


def image_to_tensor(image: Image.Image | str | Path, resolution: int) -> torch.Tensor:
    """Path or PIL image -> float (3, R, R) in [-1, 1]."""
    if not isinstance(image, Image.Image):
        image = open_image(image)
    image = resize_center_crop(to_rgb(image), resolution)
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def random_shift(image_3HW: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate by (dy, dx), each uniform in [-max_shift, max_shift], repeating the edge pixels into
    the gap (white for emoji rendered on white): out[y, x] = in[y - dy, x - dx], clamped to the image."""
    if max_shift <= 0:
        return image_3HW
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    H, W = image_3HW.shape[-2:]
    m = max_shift
    padded = F.pad(image_3HW[None], (m, m, m, m), mode="replicate")[0]
    return padded[:, m - dy:m - dy + H, m - dx:m - dx + W]


def tensor_to_pil(images_B3HW: torch.Tensor) -> list[Image.Image]:
    """Float images in [-1, 1] -> list of RGB PIL images."""
    arr = ((images_B3HW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def mask_to_tensor(mask, image_size: tuple[int, int], resolution: int) -> torch.Tensor:
    """A user mask -> bool (R, R), True = regenerate.

    ``mask`` is a path, a PIL image or an array the size of the image (white / > 0.5 = regenerate;
    non-binary masks are thresholded at 0.5), or a box ``(x0, y0, x1, y1)`` in image pixels.
    An image with alpha regenerates where it is opaque and white; numeric images (modes I, F) and arrays
    are read by value ((1, H, W) and (H, W, C) too). It goes through the same resize + centre crop as the
    image; a resized pixel is regenerated if any part of it was masked. A mask wholly outside the centre
    square is an error, one partly outside a warning (the output is that square).
    """
    width, height = image_size
    if isinstance(mask, (tuple, list)) and len(mask) == 4 and all(np.isscalar(v) for v in mask):
        x0, y0, x1, y1 = _box_coords(mask)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box ({x0}, {y0}, {x1}, {y1}) is outside the {width}x{height} image or empty "
                             f"(need 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})")
        arr = np.zeros((height, width), dtype=np.float32)
        arr[y0:y1, x0:x1] = 1.0
    else:
        if isinstance(mask, (str, Path)):
            mask = open_image(mask, "mask")
        if isinstance(mask, Image.Image) and mask.mode in ("1", "L", "RGB", "P", "RGBA", "LA", "PA"):
            if mask.mode == "P":
                mask = mask.convert("RGBA")
            arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
            if "A" in mask.mode:      # opaque and white = regenerate (transparent = keep, whatever its colour)
                arr = arr * np.asarray(mask.getchannel("A"), dtype=np.float32) / 255.0
        else:                         # arrays, tensors and numeric images (modes I, I;16, F): by value
            try:
                arr = np.asarray(mask, dtype=np.float32)
            except (TypeError, ValueError):     # strings, ragged lists, objects...
                what = f"{type(mask).__name__} of {mask.dtype}" if hasattr(mask, "dtype") else type(mask).__name__
                raise ValueError(f"a mask must be a path, a PIL image, an array of numbers or a box "
                                 f"(x0, y0, x1, y1); got a {what}") from None
            if arr.ndim == 3 and arr.shape[0] == 1:       # (1, H, W), e.g. a channel-first tensor
                arr = arr[0]
            elif arr.ndim == 3:
                arr = arr.mean(axis=-1)
            if arr.size and arr.max() > 1.0:
                arr = arr / 255.0
        if arr.ndim != 2:
            raise ValueError(f"a mask must be 2-D (H, W), got shape {arr.shape}")
        if arr.shape != (height, width):
            raise ValueError(f"the mask is {arr.shape[1]}x{arr.shape[0]} but the image is {width}x{height}")
        arr = (arr > 0.5).astype(np.float32)
    cells = any_in_cells(arr, resolution)
    left, top, right, bottom = center_square(width, height)
    x0, y0, x1, y1 = math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)
    outside = int(arr.sum() - arr[y0:y1, x0:x1].sum())
    if outside and not cells.any():
        raise ValueError(f"the mask lies outside the centre square the image is cropped to (x {x0}..{x1}, "
                         f"y {y0}..{y1} of the {width}x{height} image): nothing there would be regenerated")
    if outside:
        logger.warning("%d masked pixels lie outside the centre square the image is cropped to (x %d..%d, y %d..%d); "
                       "the output covers that square only", outside, x0, x1, y0, y1)
    return torch.from_numpy(cells)


def _box_coords(box) -> tuple[int, int, int, int]:
    """A box's coordinates as ints (fractions truncated); ValueError unless each is a finite number."""
    if not all(isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and math.isfinite(v)) for v in box):
        raise ValueError(f"a box needs 4 finite numbers (x0, y0, x1, y1), got {tuple(box)!r}")
    return tuple(int(v) for v in box)


def token_mask(pixel_mask_BHW: torch.Tensor, grid_size: int, dilate: int = 0) -> torch.Tensor:
    """Pixel mask (True = regenerate) -> token mask (B, g, g): a token is unknown if any pixel of
    its patch is masked; ``dilate`` grows the unknown region by that many tokens."""
    m = pixel_mask_BHW.float()[:, None]
    if m.shape[-1] % grid_size or m.shape[-2] % grid_size:
        raise ValueError(f"image size {tuple(m.shape[-2:])} is not a multiple of the token grid {grid_size}")
    unknown = F.adaptive_max_pool2d(m, grid_size)
    if dilate > 0:
        unknown = F.max_pool2d(unknown, 2 * dilate + 1, stride=1, padding=dilate)
    return unknown[:, 0] > 0


def scale_masks(unknown_Bhw: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """Token mask on the finest grid -> one unknown mask per scale (unknown if it overlaps any
    unknown fine token), for VAR's scale-by-scale teacher forcing."""
    m = unknown_Bhw.float()[:, None]
    return [F.adaptive_max_pool2d(m, s)[:, 0] > 0 for s in scales]


def paste(original_B3HW: torch.Tensor, generated_B3HW: torch.Tensor, mask_BHW: torch.Tensor,
          feather: int = 0) -> torch.Tensor:
    """Keep the input's pixels outside the mask exactly; inside, the generated pixels. With
    ``feather`` > 0 the weight of the generated image is min(1, d / feather), d = a masked pixel's distance
    (in pixels, counting itself; 8-neighbourhood) to the nearest unmasked one: 1/feather on the mask's
    edge, 1 from ``feather`` pixels inside, so the blend stays inside the mask and every masked pixel,
    however thin the stroke, takes some of the generated image. The image's border is not an edge."""
    m = mask_BHW.float()[:, None].to(generated_B3HW.device)
    if feather > 0:
        depth, inside = torch.zeros_like(m), m
        for _ in range(feather):      # erosion by a 3x3 square, feather times: depth = levels survived
            depth = depth + inside
            inside = -F.max_pool2d(-F.pad(inside, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        m = depth / feather
    out = original_B3HW.to(generated_B3HW.device) * (1 - m) + generated_B3HW * m
    return torch.where(m > 0, out, original_B3HW.to(generated_B3HW.device))
