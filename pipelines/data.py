"""Datasets: the bundled emoji set, ImageFolder-style directories, and the token cache.

Image datasets yield ``(image_3HW float32 in [-1, 1], label int64)`` and carry ``.class_names``
(list[str]) and ``.labels`` (LongTensor (N,), for class-balanced sampling). Token datasets yield
``(ids_L int64, label int64)``, with L = h * w, or sum(s^2) over VAR's scales (coarse -> fine).

Train/val split: an item is in val when sha256(key), read as a fraction, is below ``VAL_FRACTION``.
Emoji use their base emoji as the key, so every style and skin tone of one emoji lands on the same side;
image folders use the file's path relative to the folder, unless the folder has ``train/`` and ``val/``.
Random horizontal flips and shifts (train split, ``DataConfig.hflip`` / ``max_shift``) draw from
``dataset.generator``; None = torch's global RNG, which the trainer's ``SeededDataset``
(pipelines/sampler.py) seeds per item.

Image folders: unreadable or truncated files are not found by the scan (that would decode every file);
loading one raises ValueError naming the file. Emoji rendering and its licences (Twemoji CC-BY 4.0,
OpenMoji CC-BY-SA 4.0, Noto Emoji Apache-2.0 / OFL) are in ``pipelines/emoji.py``.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import DatasetFolder, make_dataset
from tqdm.auto import tqdm

from pipelines import emoji
from pipelines.images import image_to_tensor, open_image, random_shift

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.1
TOKEN_CACHE_VERSION = 1


@dataclass
class DataConfig:
    dataset: str = "emoji"          # "emoji" (bundled, rendered from PyPI packages) or an ImageFolder dir
    resolution: int = 64            # side of the square images; the tokenizer's input size
    hflip: bool = True              # random horizontal flips on the train split (all classes but no_flip_classes)
    no_flip_classes: tuple[str, ...] = ()   # classes never mirrored: e.g. [Flags, Symbols] (flags, text, arrows)
    max_shift: int = 0              # random translation by up to N px (edges repeated) on the train split
    balanced: bool = False          # class-balanced sampling: skin tones make People & Body ~60% of emoji
    styles: tuple[str, ...] = ("twemoji", "openmoji", "noto")   # emoji art styles; noto only when installed
    split_people: bool = False      # emoji: People & Body -> People + Hands & Body (10 classes)
    cache_dir: str = ""             # rendered-emoji cache; "" -> $TESSERA_CACHE or ~/.cache/tessera

    def __post_init__(self):
        self.styles = tuple(self.styles)
        if not isinstance(self.resolution, int) or self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if not isinstance(self.max_shift, int) or not 0 <= self.max_shift < self.resolution // 2:
            raise ValueError(f"max_shift must be an int in [0, {self.resolution // 2}), got {self.max_shift!r}")
        unknown = [s for s in self.styles if s not in emoji.STYLES]
        if unknown or not self.styles:
            raise ValueError(f"unknown emoji style(s) {unknown or '(none given)'}; valid styles: {list(emoji.STYLES)}")
        if not self.dataset:
            raise ValueError("dataset must be 'emoji' or the path of an image folder")


def is_val(key: str) -> bool:
    """Deterministic split: sha256(key) as a fraction in [0, 1) below VAL_FRACTION -> val."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < VAL_FRACTION


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got '{split}'")


def _emoji_dataset(config: DataConfig, split: str, limit: int | None) -> emoji.EmojiDataset:
    arrays = emoji.load_emoji_arrays(config.resolution, config.cache_dir or None, limit)
    wanted = [arrays.style_names.index(s) for s in config.styles if s in arrays.style_names]
    keep = np.isin(arrays.style_ids, wanted)
    if not keep.any():
        raise ValueError(f"none of the emoji styles {list(config.styles)} is available "
                         f"(available: {list(emoji.available_styles())}; noto needs `apt install fonts-noto-color-emoji`)")
    keep &= np.array([is_val(k) == (split == "val") for k in arrays.split_keys.tolist()])
    if not keep.any():
        raise ValueError(f"the emoji {split} split is empty (styles {list(config.styles)})")
    train = split == "train"
    return emoji.EmojiDataset(arrays, keep, config.split_people, random_flip=config.hflip and train,
                              max_shift=config.max_shift if train else 0)


def _pil_extensions() -> tuple[str, ...]:
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_dirs(folder: Path) -> list[str]:
    classes = _subdirs(folder)
    if not classes:
        raise ValueError(f"image folder {folder} has no class subfolders (expected {folder}/<class>/<image>)")
    if len(classes) == 1:
        raise ValueError(f"image folder {folder} has a single class folder ('{classes[0]}'): "
                         "class-conditional training needs at least 2 classes")
    return classes


class ImageFolderDataset(DatasetFolder):
    """torchvision's DatasetFolder (class per subfolder, every PIL-readable extension), decoded and
    resized by pipelines/images.py exactly as at inference: any mode -> RGB (alpha on white, 16-bit
    rescaled), shorter side resized, centre crop; then a random flip when ``random_flip`` and a random
    shift of up to ``max_shift`` pixels.

    ``classes`` forces the class list (a val/ dir takes train/'s); ``split_by_hash`` ("train" | "val")
    keeps one side of the deterministic hash split.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, random_flip: bool = False,
                 classes: list[str] | None = None, split_by_hash: str | None = None, max_shift: int = 0):
        self._forced_classes = classes
        super().__init__(str(root), loader=open_image, extensions=_pil_extensions(),
                         transform=functools.partial(image_to_tensor, resolution=resolution))
        if split_by_hash is not None:
            self.samples = [(p, t) for p, t in self.samples
                            if is_val(Path(os.path.relpath(p, self.root)).as_posix()) == (split_by_hash == "val")]
            self.imgs, self.targets = self.samples, [t for _, t in self.samples]
        if not self.samples:
            raise ValueError(f"image folder {root} has no images for the {split_by_hash or 'val'} split")
        self.class_names = list(self.classes)
        self.labels = torch.tensor(self.targets, dtype=torch.long)
        self.random_flip, self.max_shift = random_flip, max_shift
        self.no_flip_labels: frozenset[int] = frozenset()     # classes never mirrored (DataConfig.no_flip_classes)
        self.generator: torch.Generator | None = None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._forced_classes is None:
            classes = _class_dirs(Path(directory))
        else:
            classes = list(self._forced_classes)
            extra = sorted(set(_subdirs(Path(directory))) - set(classes))
            if extra:
                raise ValueError(f"image folder {directory} has class folders {extra} that the train split lacks")
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = make_dataset(directory, class_to_idx, extensions=extensions, allow_empty=True)
        found = {t for _, t in samples}
        empty = [c for c, i in class_to_idx.items() if i not in found]
        if empty and self._forced_classes is None:    # a val/ dir may lack a class; a train dir may not
            raise ValueError(f"image folder {directory}: class folder(s) {empty} contain no readable image files")
        return samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = super().__getitem__(i)
        flip = self.random_flip and bool(torch.rand((), generator=self.generator) < 0.5)   # drawn for every item
        if flip and label not in self.no_flip_labels:
            image = image.flip(-1)
        return random_shift(image, self.max_shift, self.generator), torch.tensor(label, dtype=torch.long)


def _folder_dataset(config: DataConfig, split: str) -> ImageFolderDataset:
    root = Path(config.dataset).expanduser()
    if not root.is_dir():
        raise ValueError(f"dataset '{config.dataset}' is neither 'emoji' nor an existing image folder")
    flip, shift = (config.hflip, config.max_shift) if split == "train" else (False, 0)
    if (root / "train").is_dir() and not (root / "val").is_dir() and _looks_split(root):
        raise ValueError(f"{root} has train/ but no val/: add val/<class>/ images, or point --data at "
                         f"{root / 'train'} (its images are then split into train and val by file-name hash)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        if split == "train":
            return ImageFolderDataset(root / "train", config.resolution, flip, max_shift=shift)
        return ImageFolderDataset(root / "val", config.resolution, classes=_class_dirs(root / "train"))
    return ImageFolderDataset(root, config.resolution, flip, split_by_hash=split, max_shift=shift)


def _looks_split(root: Path) -> bool:
    """A train/ folder whose subfolders hold the classes (not a dataset with one class named 'train')."""
    return any(p.is_dir() for p in (root / "train").iterdir())


def build_image_dataset(config: DataConfig, split: str, *, limit: int | None = None) -> Dataset:
    """The dataset ``config`` names, one split: items (image (3, H, W) float32 in [-1, 1], label int64).

    ``limit`` (emoji only; tests) renders an evenly spaced subset of that many emoji.
    """
    _check_split(split)
    dataset = _emoji_dataset(config, split, limit) if config.dataset == "emoji" else _folder_dataset(config, split)
    dataset.no_flip_labels = class_ids_of(dataset.class_names, config.no_flip_classes, "data.no_flip_classes")
    return dataset


def class_ids_of(class_names: Sequence[str], names: Sequence[str], where: str) -> frozenset[int]:
    """The ids of ``names`` among a dataset's classes; ValueError (naming ``where``) for one it lacks."""
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise ValueError(f"{where}: no class {unknown[0]!r} in this dataset; its classes: {', '.join(class_names)}")
    return frozenset(class_names.index(n) for n in names)


def _labels_of(dataset) -> torch.Tensor | None:
    if isinstance(dataset, Subset):
        parent = _labels_of(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(dataset.indices, dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    return None if labels is None else torch.as_tensor(labels, dtype=torch.long)


def sample_weights(dataset) -> torch.Tensor | None:
    """Per-item weights 1 / (count of its class), float64 (N,), for WeightedRandomSampler; every class
    then has the same total weight. None when the dataset has no ``.labels``."""
    labels = _labels_of(dataset)
    if labels is None:
        return None
    counts = torch.bincount(labels).double()
    return 1.0 / counts[labels]


# ---------------------------------------------------------------------------------------------------
# Token cache: every image tokenized once (and its mirror image), stored as safetensors shards.
# Layout of a cache dir: info.json, labels.safetensors (labels (N,) int64), shard-00000.safetensors ...
# (each: ids (n, L) int32, labels (n,) int64). info.json is written last: no info.json, no cache.
# ---------------------------------------------------------------------------------------------------

@dataclass
class TokenCacheInfo:
    tokenizer_hash: str             # tokenizer.fingerprint() of the tokenizer that made the ids
    grid_size: int                  # tokens per side of the finest grid
    scales: tuple[int, ...]         # VAR side lengths coarse -> fine; () for a single-scale tokenizer
    codebook_size: int
    class_names: list[str]
    num_items: int
    seq_len: int                    # L = grid_size^2, or sum(s^2 for s in scales)
    shards: list[str]               # file names inside the cache dir
    shard_sizes: list[int]
    flips: bool                     # whether mirrored images were tokenized too
    version: int = TOKEN_CACHE_VERSION
    unflipped_classes: list[str] = dataclasses.field(default_factory=list)   # classes with no mirrored copies


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)       # readers see the old file or the whole new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _encode_BL(tokenizer, images_B3HW: torch.Tensor, multiscale: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Images -> ids (B, L) int32 on the CPU, and the scales (() for single-scale)."""
    if multiscale:
        ids_list = tokenizer.encode_scales(images_B3HW)                  # [(B, s, s)] coarse -> fine
        scales = tuple(int(ids.shape[-1]) for ids in ids_list)
        ids_BL = torch.cat([ids.reshape(ids.shape[0], -1) for ids in ids_list], dim=1)
    else:
        ids_Bhw = tokenizer.encode(images_B3HW)
        ids_BL, scales = ids_Bhw.reshape(ids_Bhw.shape[0], -1), ()
    return ids_BL.to("cpu", torch.int32), scales


def _innermost(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


@contextlib.contextmanager
def _deterministic(dataset, tokenizer):
    """No random flips (flips are tokenized explicitly) or shifts, the tokenizer in eval mode; restored after."""
    inner = _innermost(dataset)
    flip, shift = getattr(inner, "random_flip", None), getattr(inner, "max_shift", None)
    training = getattr(tokenizer, "training", None)
    if flip is not None:
        inner.random_flip = False
    if shift is not None:
        inner.max_shift = 0
    if training is not None:
        tokenizer.eval()
    try:
        yield
    finally:
        if flip is not None:
            inner.random_flip = flip
        if shift is not None:
            inner.max_shift = shift
        if training is not None:
            tokenizer.train(training)


def tokenize_dataset(tokenizer, dataset, out_dir: str | os.PathLike, batch_size: int = 64, flips: bool = True,
                     shard_size: int = 8192, device: torch.device | str | None = None,
                     num_workers: int = 0, no_flip_classes: Sequence[str] = ()) -> TokenCacheInfo:
    """Encode every image of ``dataset`` (and, with ``flips``, its horizontal flip unless its class is in
    ``no_flip_classes``) once; write shards + info.json.

    Items are written in a fixed shuffled order (seed 0) so every shard mixes classes; each image's
    flip follows in the same batch. ``device`` defaults to the tokenizer's parameters' device.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    if len(dataset) == 0:
        raise ValueError("cannot tokenize an empty dataset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)       # an interrupted rewrite must not look complete
    multiscale = getattr(getattr(tokenizer, "config", None), "quantizer", "vq") == "multiscale"
    if device is None:
        params = tokenizer.parameters() if isinstance(tokenizer, torch.nn.Module) else iter(())
        device = next(params, torch.empty(0)).device
    class_names = list(getattr(_innermost(dataset), "class_names", []))
    no_flip_ids = torch.tensor(sorted(class_ids_of(class_names, no_flip_classes, "no_flip_classes")), dtype=torch.long)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers)
    shards, sizes, all_labels, pending_ids, pending_labels = [], [], [], [], []
    scales: tuple[int, ...] = ()

    def flush(final: bool) -> None:
        nonlocal pending_ids, pending_labels
        ids, labels = torch.cat(pending_ids), torch.cat(pending_labels)
        while len(ids) >= shard_size or (final and len(ids)):
            name = f"shard-{len(shards):05d}.safetensors"
            chunk = {"ids": ids[:shard_size].contiguous(), "labels": labels[:shard_size].contiguous()}
            _atomic_write(out / name, lambda p: save_file(chunk, str(p)))
            shards.append(name)
            sizes.append(len(chunk["ids"]))
            all_labels.append(chunk["labels"])
            ids, labels = ids[shard_size:], labels[shard_size:]
        pending_ids, pending_labels = [ids], [labels]

    with _deterministic(dataset, tokenizer), torch.no_grad():
        for images, labels in tqdm(loader, desc="tokenize", unit="batch", mininterval=2.0):
            images, labels_B = images.to(device), torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            variants = [(images, labels_B)]
            if flips:                  # mirrored copies, except of the classes that must not be mirrored
                keep_B = ~torch.isin(labels_B, no_flip_ids)
                if keep_B.any():
                    variants.append((images[keep_B.to(device)].flip(-1), labels_B[keep_B]))
            for x, y in variants:
                ids_BL, scales = _encode_BL(tokenizer, x, multiscale)
                pending_ids.append(ids_BL)
                pending_labels.append(y)
            if sum(len(i) for i in pending_ids) >= shard_size:
                flush(final=False)
        flush(final=True)

    labels_N = torch.cat(all_labels)
    _atomic_write(out / "labels.safetensors", lambda p: save_file({"labels": labels_N}, str(p)))
    info = TokenCacheInfo(
        tokenizer_hash=str(tokenizer.fingerprint()), grid_size=int(tokenizer.grid_size), scales=scales,
        codebook_size=int(tokenizer.codebook_size), class_names=class_names,
        num_items=len(labels_N), seq_len=int(ids_BL.shape[1]), shards=shards, shard_sizes=sizes, flips=flips,
        unflipped_classes=list(no_flip_classes) if flips else [])
    _atomic_write(out / "info.json", lambda p: p.write_text(json.dumps(dataclasses.asdict(info), indent=1)))
    for stale in set(p.name for p in out.glob("shard-*.safetensors")) - set(shards):   # from a larger old cache
        (out / stale).unlink()
    logger.info("tokenized %d items into %d shards at %s", info.num_items, len(shards), out)
    return info


def read_token_info(path: str | os.PathLike) -> TokenCacheInfo:
    """info.json of a token cache dir -> TokenCacheInfo; missing or malformed -> ValueError naming it."""
    file = Path(path) / "info.json"
    if not file.is_file():
        raise ValueError(f"no token cache at {path}: {file} is missing (tokenize the dataset first)")
    try:
        raw = json.loads(file.read_text())
        if raw.get("version") != TOKEN_CACHE_VERSION:
            raise ValueError(f"format version {raw.get('version')}, expected {TOKEN_CACHE_VERSION} (written by "
                             f"another tessera version: run `tessera tokenize` again)")
        info = TokenCacheInfo(**raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"token cache file {file} is corrupt: {e}") from None
    info.scales = tuple(info.scales)
    if len(info.shards) != len(info.shard_sizes) or sum(info.shard_sizes) != info.num_items:
        raise ValueError(f"token cache file {file} is corrupt: shard sizes do not add up to num_items")
    return info


class TokenDataset(Dataset):
    """A token cache dir as a dataset of (ids_L int64, label int64), reading shards lazily.

    A shard is loaded on first use and kept (per process, so DataLoader workers each hold only the
    shards they touch). ``shard_ranges[k] = (start, end)`` lets the shard-aware sampler
    (pipelines/sampler.py) give each rank whole shards of its own; ``retain_shards`` frees the rest.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.info = read_token_info(self.path)
        ends = np.cumsum(self.info.shard_sizes).tolist()
        self._starts = [0] + ends[:-1]
        self.shard_ranges = list(zip(self._starts, ends))
        self._shards: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._labels: torch.Tensor | None = None

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def __len__(self) -> int:
        return self.info.num_items

    def _read(self, name: str, expect: dict[str, tuple]) -> dict[str, torch.Tensor]:
        file = self.path / name
        try:
            tensors = load_file(str(file))
        except FileNotFoundError:
            raise ValueError(f"token cache {self.path} is incomplete: {file} is missing") from None
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"token cache file {file} is corrupt: {e}") from None
        for key, shape in expect.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise ValueError(f"token cache file {file} is corrupt: '{key}' has shape {got}, expected {shape}")
        return tensors

    def _shard(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k not in self._shards:
            n = self.info.shard_sizes[k]
            t = self._read(self.info.shards[k], {"ids": (n, self.info.seq_len), "labels": (n,)})
            self._shards[k] = (t["ids"], t["labels"])
        return self._shards[k]

    def retain_shards(self, keep) -> None:
        """Drop the loaded shards not in ``keep`` (shard ids); the Trainer calls it at each epoch start with
        the shard-aware sampler's shards, so a rank holds only its current shards."""
        keep = set(keep)
        self._shards = {k: v for k, v in self._shards.items() if k in keep}

    @property
    def loaded_shards(self) -> list[int]:
        """Ids of the shards this process holds in memory."""
        return sorted(self._shards)

    @property
    def labels(self) -> torch.Tensor:
        """All labels (N,) int64, from the small labels file (no shard is loaded)."""
        if self._labels is None:
            self._labels = self._read("labels.safetensors", {"labels": (len(self),)})["labels"].long()
        return self._labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a token cache of {len(self)} items")
        k = bisect.bisect_right(self._starts, i) - 1
        ids_NL, labels_N = self._shard(k)
        j = i - self._starts[k]
        return ids_NL[j].long(), labels_N[j].long()

    def check_tokenizer(self, tokenizer_hash) -> None:
        """ValueError unless the cache was made by this tokenizer: its fingerprint (config and weights), given
        as a str or as the tokenizer."""
        if hasattr(tokenizer_hash, "fingerprint"):
            tokenizer_hash = tokenizer_hash.fingerprint()
        if str(tokenizer_hash) != self.info.tokenizer_hash:
            raise ValueError(f"tokens at {self.path} were made by tokenizer {self.info.tokenizer_hash}, "
                             f"but the tokenizer given is {tokenizer_hash}")
