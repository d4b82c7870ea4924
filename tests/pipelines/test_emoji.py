import os

import numpy as np
import pytest
from PIL import Image

from pipelines import emoji

STYLES_HERE = emoji.available_styles()
needs_noto = pytest.mark.skipif("noto" not in STYLES_HERE, reason="fonts-noto-color-emoji is not installed")


def _entry(unified):
    return next(e for e in emoji.emoji_catalog() if e.unified == unified)


@pytest.mark.parametrize("unified, category", [
    ("1F600", "Smileys & Emotion"),       # grinning face
    ("1F436", "Animals & Nature"),        # dog face
    ("1F34E", "Food & Drink"),            # red apple
    ("1F1FA-1F1F8", "Flags"),             # flag: United States
    ("26BD", "Activities"),               # soccer ball
    ("1F44D-1F3FD", "People & Body"),     # thumbs up: medium skin tone
])
def test_known_emoji_have_their_unicode_group(unified, category):
    assert emoji.class_name(_entry(unified)) == category


def test_catalog_has_nine_sorted_classes_and_no_components():
    entries = emoji.emoji_catalog()
    assert len(entries) == 3773                                      # 1898 emoji + 1875 skin-tone variants
    assert sorted({e.category for e in entries}) == list(emoji.EMOJI_CLASSES)
    assert list(emoji.EMOJI_CLASSES) == sorted(emoji.EMOJI_CLASSES) and len(emoji.EMOJI_CLASSES) == 9
    assert not any(e.unified in ("1F3FB", "1F3FF") for e in entries)  # bare skin-tone swatches are Components
    assert len({e.unified for e in entries}) == len(entries)


def test_split_people_moves_hands_and_body_parts_only():
    assert emoji.class_name(_entry("1F44D-1F3FD"), split_people=True) == "Hands & Body"   # thumbs up
    assert emoji.class_name(_entry("1F4AA"), split_people=True) == "Hands & Body"         # flexed biceps
    assert emoji.class_name(_entry("1F9D1"), split_people=True) == "People"               # person
    assert emoji.class_name(_entry("1F600"), split_people=True) == "Smileys & Emotion"
    names = {emoji.class_name(e, True) for e in emoji.emoji_catalog()}
    assert sorted(names) == list(emoji.EMOJI_CLASSES_SPLIT)


def test_skin_tones_and_obsoleted_aliases_share_the_split_key():
    by_code = {e.unified: e for e in emoji.emoji_catalog()}
    assert {by_code[u].split_key for u in ("1F44D", "1F44D-1F3FB", "1F44D-1F3FF")} == {"1F44D"}
    assert by_code["1F3C3"].split_key == by_code["1F3C3-200D-2642-FE0F"].split_key   # RUNNER / MAN RUNNING


@pytest.mark.parametrize("style", STYLES_HERE)
def test_grinning_face_renders_in_colour_on_white(style):
    img = emoji.render_emoji("1F600", style, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all()             # white background corners
    r, g, b = (img[..., c].astype(int) for c in range(3))
    assert ((r > 180) & (g > 140) & (b < 100)).sum() > 50                       # a yellow face, not tofu


def test_glyphs_a_style_lacks_are_skipped_not_drawn_as_tofu():
    assert emoji.render_emoji("10FFFD", "openmoji", 32) is None
    assert emoji.render_emoji("10FFFD", "twemoji", 32) is None
    with pytest.raises(ValueError, match="emoji style 'sketch' is not available"):
        emoji.render_emoji("1F600", "sketch", 32)


@needs_noto
def test_noto_renders_when_installed():
    assert emoji.render_emoji("1F436", "noto", 32) is not None


def test_to_square_centres_the_glyph_with_a_white_margin():
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (10, 10, 90, 30))                # an 80x20 red bar near the top
    out = emoji.to_square(rgba, 32)
    assert out.shape == (32, 32, 3)
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    rows, cols = np.nonzero(red)
    assert cols.min() == 1 and cols.max() == 30                   # longer side fills 32 * (1 - 2/32) = 30 px
    assert abs((rows.min() + rows.max()) / 2 - 15.5) <= 1         # centred vertically
    assert (out[0] == 255).all() and (out[:, 0] == 255).all()


def test_cache_round_trip_reads_the_npz_and_is_atomic(tmp_path, monkeypatch):
    first = emoji.load_emoji_arrays(32, tmp_path, limit=12)
    path = emoji.cache_path(32, tmp_path, limit=12)
    assert path.is_file() and path.parent.parent == tmp_path
    assert [p.name for p in path.parent.iterdir()] == [path.name]               # no temp file left behind
    assert first.images.shape == (12 * len(STYLES_HERE), 32, 32, 3) and first.images.dtype == np.uint8

    monkeypatch.setattr(emoji, "render_all", lambda *a, **k: pytest.fail("rendered again instead of reading"))
    second = emoji.load_emoji_arrays(32, tmp_path, limit=12)
    for field in ("images", "labels", "hands_body", "unified", "split_keys", "style_ids"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field
    assert second.class_names == emoji.EMOJI_CLASSES and second.style_names == emoji.STYLES


def test_the_cache_file_is_read_once_per_process_until_it_changes(tmp_path, monkeypatch):
    emoji.load_emoji_arrays(32, tmp_path, limit=2)
    path, reads, load = emoji.cache_path(32, tmp_path, limit=2), [], emoji._load
    monkeypatch.setattr(emoji, "_load", lambda p: reads.append(p) or load(p))
    a = emoji.load_emoji_arrays(32, tmp_path, limit=2)       # train split
    b = emoji.load_emoji_arrays(32, tmp_path, limit=2)       # val split of the same command
    assert reads == [path] and a is b
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))    # rewritten (rendered again elsewhere)
    emoji.load_emoji_arrays(32, tmp_path, limit=2)
    assert reads == [path, path]


def test_a_damaged_cache_is_rendered_again(tmp_path):
    path = emoji.cache_path(32, tmp_path, limit=3)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip file")
    arrays = emoji.load_emoji_arrays(32, tmp_path, limit=3)
    assert len(arrays.labels) == 3 * len(STYLES_HERE)
    assert emoji.load_emoji_arrays(32, tmp_path, limit=3).images.tobytes() == arrays.images.tobytes()


def test_cache_key_depends_on_resolution_and_limit(tmp_path, monkeypatch):
    names = {emoji.cache_path(r, tmp_path, limit=l).name for r in (32, 64) for l in (None, 10)}
    assert len(names) == 4
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "env"))
    assert emoji.cache_root() == tmp_path / "env" and emoji.cache_root(tmp_path) == tmp_path
