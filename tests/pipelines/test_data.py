import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from pipelines import emoji
from pipelines.config import ConfigError, from_dict
from pipelines.data import (DataConfig, TokenDataset, build_image_dataset, is_val, read_token_info, sample_weights,
                            tokenize_dataset)

LIMIT = 90      # emoji rendered for these tests (evenly spaced over all groups); the real default renders all


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _emoji(cache, split, **kw):
    return build_image_dataset(DataConfig(resolution=32, cache_dir=cache, **kw), split, limit=LIMIT)


# ---------------------------------------------------------------- config

def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="positive multiple of 8, got 30"):
        DataConfig(resolution=30)
    with pytest.raises(ValueError, match=r"unknown emoji style\(s\) \['sketch'\]; valid styles: \['twemoji', 'openmoji', 'noto'\]"):
        DataConfig(styles=("twemoji", "sketch"))
    with pytest.raises(ConfigError, match="data: unknown emoji style"):
        from_dict(DataConfig, {"styles": ["comic"]}, "data")
    assert from_dict(DataConfig, {"styles": ["twemoji"]}, "data").styles == ("twemoji",)
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        build_image_dataset(DataConfig(), "test")


# ---------------------------------------------------------------- emoji

def test_emoji_split_is_deterministic_and_keeps_each_emoji_on_one_side(emoji_cache):
    train, val = _emoji(emoji_cache, "train"), _emoji(emoji_cache, "val")
    assert train.unified == _emoji(emoji_cache, "train").unified
    assert len(val) > 0 and len(train) > 5 * len(val)
    assert not set(train.unified) & set(val.unified)
    sides = defaultdict(set)                                      # over all emoji: styles and skin tones together
    for e in emoji.emoji_catalog():
        sides[e.split_key].add(is_val(e.split_key))
    assert all(len(s) == 1 for s in sides.values())
    val_fraction = np.mean([next(iter(s)) for s in sides.values()])
    assert 0.07 < val_fraction < 0.13


def test_emoji_items_are_labelled_images_in_range_with_white_corners(emoji_cache):
    ds = _emoji(emoji_cache, "train", hflip=False)
    category = {e.unified: e.category for e in emoji.emoji_catalog()}
    assert ds.class_names == list(emoji.EMOJI_CLASSES)
    assert all(ds.class_names[int(label)] == category[u] for u, label in zip(ds.unified, ds.labels))
    assert set(ds.labels.tolist()) == set(range(9))
    for i in range(0, len(ds), 17):
        image, label = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label.dtype == torch.int64
        assert image.min() >= -1 and image.max() <= 1
        assert (image[:, [0, 0, -1, -1], [0, -1, 0, -1]] == 1).all()          # white corners


def test_emoji_styles_split_people_and_flips(emoji_cache):
    twemoji_only = _emoji(emoji_cache, "train", styles=("twemoji",))
    assert set(twemoji_only.style_ids.tolist()) == {0}
    split = _emoji(emoji_cache, "train", split_people=True)
    assert split.class_names == list(emoji.EMOJI_CLASSES_SPLIT)
    by_code = {e.unified: e for e in emoji.emoji_catalog()}
    assert all(split.class_names[int(l)] == emoji.class_name(by_code[u], True) for u, l in zip(split.unified, split.labels))
    train = _emoji(emoji_cache, "train")
    assert train.random_flip and not _emoji(emoji_cache, "val").random_flip
    train.generator = torch.Generator().manual_seed(1)
    flips = [not torch.equal(train[0][0], train.images_NHW3[0].permute(2, 0, 1).float() / 127.5 - 1) for _ in range(40)]
    assert 5 < sum(flips) < 35                                    # a fair coin, drawn from the given generator
    # a class in no_flip_classes is never mirrored; the coin is still drawn, so the other items flip as before
    name = train.class_names[int(train.labels[0])]
    kept = _emoji(emoji_cache, "train", no_flip_classes=(name,))
    kept.generator = torch.Generator().manual_seed(1)
    assert all(torch.equal(kept[0][0], train.images_NHW3[0].permute(2, 0, 1).float() / 127.5 - 1) for _ in range(40))
    other = next(i for i in range(len(train)) if train.labels[i] != train.labels[0])
    train.generator, kept.generator = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert all(torch.equal(train[other][0], kept[other][0]) for _ in range(10))
    with pytest.raises(ValueError, match="data.no_flip_classes: no class 'Flagz'"):
        _emoji(emoji_cache, "train", no_flip_classes=("Flagz",))


def test_emoji_shifts_on_the_train_split_only(emoji_cache):
    """max_shift translates train images (white comes in at the edges), never val ones, and the
    token cache switches shifts off while it encodes."""
    train = _emoji(emoji_cache, "train", hflip=False, max_shift=3)
    val = _emoji(emoji_cache, "val", hflip=False, max_shift=3)
    assert (train.max_shift, val.max_shift) == (3, 0)
    train.generator = torch.Generator().manual_seed(0)
    i = next(i for i, im in enumerate(train.images_NHW3) if (im[:5, :5] == 255).all())   # a white corner
    plain = train.images_NHW3[i].permute(2, 0, 1).float() / 127.5 - 1
    shifted = [train[i][0] for _ in range(20)]
    assert sum(not torch.equal(x, plain) for x in shifted) > 10
    assert all(torch.equal(x[:, :2, :2], torch.ones(3, 2, 2)) for x in shifted)    # corners stay white
    val_plain = val.images_NHW3[0].permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(val[0][0], val_plain)
    with pytest.raises(ValueError, match="max_shift"):
        DataConfig(resolution=32, max_shift=16)


def test_balanced_weights_give_every_class_the_same_total(emoji_cache):
    ds = _emoji(emoji_cache, "train")
    w = sample_weights(ds)
    assert w.shape == (len(ds),) and w.dtype == torch.float64
    totals = torch.zeros(9, dtype=torch.float64).index_add_(0, ds.labels, w)
    assert torch.allclose(totals, torch.ones(9, dtype=torch.float64))
    sub = Subset(ds, list(range(0, len(ds), 2)))
    sub_totals = torch.zeros(9, dtype=torch.float64).index_add_(0, ds.labels[::2], sample_weights(sub))
    assert torch.allclose(sub_totals[sub_totals > 0], torch.tensor(1.0, dtype=torch.float64))
    assert sample_weights(torch.utils.data.TensorDataset(torch.zeros(3))) is None


# ---------------------------------------------------------------- image folders

def _write_modes(folder):
    """One file per PIL mode the loader must convert; returns {file name: expected colour at the centre}."""
    folder.mkdir(parents=True)
    rgba = Image.new("RGBA", (40, 24), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (12, 0, 28, 24))
    rgba.save(folder / "rgba.png")
    Image.new("L", (24, 40), 100).save(folder / "grey.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).convert("P").save(folder / "palette.gif")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16)).save(folder / "sixteen.png")
    return {"rgba.png": (255, 0, 0), "grey.png": (100, 100, 100), "palette.gif": (0, 0, 255),
            "cmyk.jpg": (255, 0, 0), "sixteen.png": (128, 128, 128)}


def test_image_folder_converts_every_mode_to_rgb_of_the_right_size(tmp_path):
    expected = _write_modes(tmp_path / "a")
    _write_modes(tmp_path / "b")
    ds = build_image_dataset(DataConfig(dataset=str(tmp_path), resolution=16, hflip=False), "train")
    assert ds.class_names == ["a", "b"] and len(ds) > 0
    ds.samples = [(str(tmp_path / "a" / name), 0) for name in expected]      # every file, not one split's
    for i, (name, colour) in enumerate(expected.items()):
        image, label = ds[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and int(label) == 0
        centre = ((image[:, 8, 8] + 1) * 127.5).round()
        assert torch.allclose(centre, torch.tensor(colour, dtype=torch.float32), atol=12), (name, centre)
    assert (ds[0][0][:, 8, 0] == 1).all()                          # rgba.png: transparent -> white


def test_image_folder_splits(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "flat" / c).mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "flat" / c / f"{i}.png")
    cfg = DataConfig(dataset=str(tmp_path / "flat"), resolution=8)
    train, val = build_image_dataset(cfg, "train"), build_image_dataset(cfg, "val")
    assert len(train) + len(val) == 60 and not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert [p for p, _ in build_image_dataset(cfg, "val").samples] == [p for p, _ in val.samples]
    assert train.labels.tolist() == [t for _, t in train.samples] and train.random_flip and not val.random_flip

    for split, classes in (("train", ("cat", "dog")), ("val", ("dog",))):     # val/ may lack a class
        for c in classes:
            (tmp_path / "tv" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "tv" / split / c / "x.png")
    val = build_image_dataset(DataConfig(dataset=str(tmp_path / "tv"), resolution=8), "val")
    assert val.class_names == ["cat", "dog"] and val.labels.tolist() == [1]   # ids follow train/
    for c in ("cat", "dog"):                                                  # train/ without val/: say so
        (tmp_path / "only" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "only" / "train" / c / "x.png")
    with pytest.raises(ValueError, match="has train/ but no val/: add val/<class>/ images, or point --data at"):
        build_image_dataset(DataConfig(dataset=str(tmp_path / "only"), resolution=8), "train")


def test_image_folder_errors_name_the_folder_or_file(tmp_path, monkeypatch):
    def build(path):
        return build_image_dataset(DataConfig(dataset=str(path), resolution=8), "train")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"image folder .*empty has no class subfolders"):
        build(tmp_path / "empty")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "cat" / "x.png")
    with pytest.raises(ValueError, match=r"one has a single class folder \('cat'\)"):
        build(tmp_path / "one")
    (tmp_path / "one" / "dog").mkdir()
    (tmp_path / "one" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['dog'\] contain no readable image files"):
        build(tmp_path / "one")
    with pytest.raises(ValueError, match="is neither 'emoji' nor an existing image folder"):
        build(tmp_path / "missing")

    good = Image.new("RGB", (64, 64), (1, 2, 3))
    good.save(tmp_path / "one" / "dog" / "broken.png")
    data = (tmp_path / "one" / "dog" / "broken.png").read_bytes()
    (tmp_path / "one" / "dog" / "broken.png").write_bytes(data[: len(data) // 2])       # truncated
    ds = build_image_dataset(DataConfig(dataset=str(tmp_path / "one"), resolution=8), "train")
    ds.samples = [(str(tmp_path / "one" / "dog" / "broken.png"), 1), (str(tmp_path / "one" / "cat" / "x.png"), 0)]
    with pytest.raises(ValueError, match=r"broken\.png"):
        ds[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)            # decompression-bomb guard
    with pytest.raises(ValueError, match=r"x\.png is too large"):
        ds[1]


# ---------------------------------------------------------------- token cache

class _Images(Dataset):
    def __init__(self, n=10):
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.labels = torch.arange(n) % 3
        self.class_names = ["a", "b", "c"]
        self.random_flip, self.max_shift = True, 2

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        assert not self.random_flip and not self.max_shift, "the token cache must switch augmentation off"
        return self.images[i], self.labels[i]


class _FakeTokenizer(torch.nn.Module):
    """ids = quantized mean of 4x4 patches: deterministic, and different for a mirrored image."""

    def __init__(self, quantizer="vq", tag="tok-a"):
        super().__init__()
        self.config = SimpleNamespace(quantizer=quantizer)
        self.codebook_size, self.grid_size, self.scales, self.tag = 16, 2, (1, 2), tag

    def fingerprint(self):
        return self.tag

    def _grid(self, images, s):
        assert not self.training
        x = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), s)[:, 0]
        return ((x + 1) / 2 * 15.99).long().clamp(0, 15)

    def encode(self, images):
        return self._grid(images, 2)                     # (B, 2, 2)

    def encode_scales(self, images):
        return [self._grid(images, s) for s in self.scales]


@pytest.mark.parametrize("quantizer", ["vq", "multiscale"])
def test_token_cache_round_trip(tmp_path, quantizer):
    ds, tok = _Images(10), _FakeTokenizer(quantizer).train()
    info = tokenize_dataset(tok, ds, tmp_path, batch_size=3, flips=True, shard_size=4)
    assert tok.training and ds.random_flip and ds.max_shift == 2  # all restored
    L = 4 if quantizer == "vq" else 1 + 4
    assert (info.num_items, info.seq_len, info.shard_sizes) == (20, L, [4, 4, 4, 4, 4])
    assert info.scales == (() if quantizer == "vq" else (1, 2)) and info.tokenizer_hash == "tok-a"
    assert info.class_names == ["a", "b", "c"] and info.grid_size == 2 and info.codebook_size == 16

    def ids_of(x):
        x = x[None]
        if quantizer == "vq":
            return tok.encode(x).flatten().tolist()
        return torch.cat([t.flatten() for t in tok.encode_scales(x)]).tolist()    # coarse -> fine

    tok.eval()
    expected = sorted((ids_of(im), int(l)) for im, l in zip(ds.images, ds.labels))
    expected = sorted(expected + [(ids_of(im.flip(-1)), int(l)) for im, l in zip(ds.images, ds.labels)])
    cache = TokenDataset(tmp_path)
    assert cache.shard_ranges == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    first_ids, first_label = cache[0]
    assert first_ids.dtype == torch.int64 and first_ids.shape == (L,) and first_label.dtype == torch.int64
    assert list(cache._shards) == [0]                              # lazy: only the shard that was needed
    items = sorted((cache[i][0].tolist(), int(cache[i][1])) for i in range(len(cache)))
    assert items == expected
    assert cache.labels.tolist() == [int(cache[i][1]) for i in range(len(cache))]
    assert cache.class_names == ["a", "b", "c"] and cache[-1][0].tolist() == cache[19][0].tolist()
    cache.check_tokenizer("tok-a")
    cache.check_tokenizer(tok)
    with pytest.raises(ValueError, match=f"tokens at {tmp_path} were made by tokenizer tok-a, but the tokenizer given is tok-b"):
        cache.check_tokenizer("tok-b")
    with pytest.raises(IndexError):
        cache[20]


def test_token_cache_leaves_the_no_flip_classes_unmirrored(tmp_path):
    ds, tok = _Images(10), _FakeTokenizer("vq")                  # labels 0,1,2,0,1,2,...: "b" has 3 images
    info = tokenize_dataset(tok, ds, tmp_path, batch_size=4, flips=True, no_flip_classes=["b"])
    assert info.num_items == 10 + 7 and info.unflipped_classes == ["b"]
    cache = TokenDataset(tmp_path)
    items = sorted((cache[i][0].tolist(), int(cache[i][1])) for i in range(len(cache)))
    tok.eval()
    ids_of = lambda x: tok.encode(x[None]).flatten().tolist()  # noqa: E731
    expected = [(ids_of(im), int(l)) for im, l in zip(ds.images, ds.labels)]
    expected += [(ids_of(im.flip(-1)), int(l)) for im, l in zip(ds.images, ds.labels) if l != 1]
    assert items == sorted(expected)
    with pytest.raises(ValueError, match="no_flip_classes: no class 'd' in this dataset; its classes: a, b, c"):
        tokenize_dataset(tok, ds, tmp_path / "x", no_flip_classes=["d"])


def test_token_cache_rewrite_and_errors_name_the_file(tmp_path):
    tokenize_dataset(_FakeTokenizer(), _Images(10), tmp_path, shard_size=4)        # 20 items: 5 shards
    info = tokenize_dataset(_FakeTokenizer(), _Images(3), tmp_path, shard_size=4, flips=False)
    assert info.shards == ["shard-00000.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json", "labels.safetensors", "shard-00000.safetensors"]
    assert read_token_info(tmp_path) == info and not info.flips

    (tmp_path / "shard-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"token cache file .*shard-00000\.safetensors is corrupt"):
        TokenDataset(tmp_path)[0]
    (tmp_path / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors is missing"):
        TokenDataset(tmp_path)[0]
    raw = json.loads((tmp_path / "info.json").read_text())
    (tmp_path / "info.json").write_text(json.dumps({**raw, "num_items": 99}))
    with pytest.raises(ValueError, match=r"info\.json is corrupt: shard sizes"):
        TokenDataset(tmp_path)
    (tmp_path / "info.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"token cache file .*info\.json is corrupt"):
        TokenDataset(tmp_path)
    with pytest.raises(ValueError, match=r"no token cache at .*info\.json is missing"):
        TokenDataset(tmp_path / "nowhere")


def test_tokenizing_a_subset_of_the_emoji_train_set_encodes_unflipped_images(emoji_cache, tmp_path):
    train, tok = _emoji(emoji_cache, "train"), _FakeTokenizer()
    info = tokenize_dataset(tok, Subset(train, range(6)), tmp_path, flips=False)
    assert info.num_items == 6 and info.class_names == list(emoji.EMOJI_CLASSES) and train.random_flip
    unflipped = train.images_NHW3[:6].permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = sorted(tok.eval().encode(unflipped).flatten(1).tolist())
    cache = TokenDataset(tmp_path)
    assert sorted(cache[i][0].tolist() for i in range(6)) == expected
