import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.images import (image_to_tensor, mask_to_tensor, open_image, paste, random_shift, scale_masks, tensor_to_pil,
                              to_rgb, token_mask)


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_token_mask_any_masked_pixel_makes_the_token_unknown(factor):
    g = 4
    mask = torch.zeros(1, g * factor, g * factor, dtype=torch.bool)
    mask[0, 0, 0] = True                                  # top-left corner pixel
    mask[0, -1, -1] = True                                # bottom-right corner pixel
    mask[0, factor, 2 * factor - 1] = True                # last column of token (1, 1)
    unknown = token_mask(mask, g)
    expected = torch.zeros(1, g, g, dtype=torch.bool)
    expected[0, 0, 0] = expected[0, -1, -1] = expected[0, 1, 1] = True
    assert torch.equal(unknown, expected)


def test_token_mask_dilate_and_scales():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 12:20, 12:20] = True                          # tokens (1..2, 1..2) of an 8-px grid? no: f8 -> 4x4
    unknown = token_mask(mask, 4)
    assert unknown[0].nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert token_mask(mask, 4, dilate=1).all()
    per_scale = scale_masks(unknown, (1, 2, 4))
    assert per_scale[0].all() and per_scale[1].all() and torch.equal(per_scale[2], unknown)


def test_paste_keeps_outside_pixels_bit_exact_with_and_without_feather():
    orig, gen = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:12, 4:12] = True
    for feather in (0, 3):
        out = paste(orig, gen, mask, feather)
        assert torch.equal(out[:, :, ~mask[0]], orig[:, :, ~mask[0]])
    assert torch.equal(paste(orig, gen, mask)[:, :, mask[0]], gen[:, :, mask[0]])
    feathered = paste(orig, gen, mask, 3)
    assert torch.allclose(feathered[:, :, 8, 8], gen[:, :, 8, 8])      # deep inside: generated


def test_feather_weight_is_the_distance_to_the_mask_edge():
    """min(1, d / feather) for the distance d to the nearest unmasked pixel (8-neighbourhood, 1 on the edge):
    thin strokes and box corners keep some of the generated image, the middle of a wide mask all of it."""
    orig, gen = torch.zeros(1, 3, 20, 20), torch.ones(1, 3, 20, 20)
    box = torch.zeros(1, 20, 20, dtype=torch.bool)
    box[:, 2:18, 2:18] = True
    weight = paste(orig, gen, box, 4)[0, 0]
    for d in range(1, 9):                  # ring d of the 16 x 16 box: rows/cols 2 + d - 1 and 17 - (d - 1)
        ring = weight[1 + d:19 - d, 1 + d:19 - d].clone()
        ring[1:-1, 1:-1] = float("nan")
        edge = ring[~ring.isnan()]
        assert torch.allclose(edge, torch.full_like(edge, min(1.0, d / 4)))
    assert weight[2, 2] == 0.25 and not weight[~box[0]].any()      # a corner is an edge pixel too
    stroke = torch.zeros(1, 20, 20, dtype=torch.bool)
    stroke[:, :, 9] = True                                         # 1 px wide, touching the image border
    w = paste(orig, gen, stroke, 4)[0, 0]
    assert torch.allclose(w[:, 9], torch.full((20,), 0.25)) and not w[:, torch.arange(20) != 9].any()


def test_box_and_array_masks_and_their_errors():
    m = mask_to_tensor((0, 0, 8, 16), (16, 16), 16)
    assert m[:, :8].all() and not m[:, 8:].any()
    arr = np.zeros((16, 16)); arr[:, :8] = 0.7                          # non-binary: thresholded at 0.5
    assert torch.equal(mask_to_tensor(arr, (16, 16), 16), m)
    with pytest.raises(ValueError, match="outside the 16x16 image"):
        mask_to_tensor((0, 0, 20, 8), (16, 16), 16)
    tiny = mask_to_tensor((500, 500, 501, 501), (1024, 1024), 32)     # one pixel of 32 x 32 per cell
    assert tiny.sum() == 1 and tiny[15, 15]
    edge = mask_to_tensor((29, 0, 30, 1), (40, 20), 10)                # a wide image: centre crop x in [10, 30)
    assert edge.sum() == 1 and edge[0, 9]                               # the crop's last column
    with pytest.raises(ValueError, match="the mask is 8x16 but the image is 16x16"):
        mask_to_tensor(np.zeros((16, 8)), (16, 16), 16)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_any_mode_converts_to_rgb(mode, tmp_path):
    im = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    path = tmp_path / "x.png" if mode not in ("CMYK",) else tmp_path / "x.jpg"
    im.save(path)
    t = image_to_tensor(path, 8)
    assert t.shape == (3, 8, 8) and t.min() >= -1 and t.max() <= 1
    assert to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_bad_files_give_errors_that_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png is not an image"):
        open_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        open_image(tmp_path / "cut.png")


def test_tensor_pil_round_trip():
    t = torch.randint(0, 256, (1, 3, 4, 4)).float() / 127.5 - 1
    back = image_to_tensor(tensor_to_pil(t)[0], 4)
    assert torch.allclose(back, t[0], atol=1e-6)


def test_random_shift_translates_with_edges_repeated():
    """out[y, x] = in[y - dy, x - dx] inside, the nearest edge pixel outside; the shift is drawn from the
    generator (same seed, same shift) and covers [-m, m] in both axes."""
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    seen = set()
    for seed in range(60):
        out = random_shift(image, 2, torch.Generator().manual_seed(seed))
        assert torch.equal(out, random_shift(image, 2, torch.Generator().manual_seed(seed)))
        dy, dx = torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        ys, xs = (torch.arange(8) - dy).clamp(0, 7), (torch.arange(8) - dx).clamp(0, 7)
        assert torch.equal(out, image[:, ys][:, :, xs])
        seen.add((dy, dx))
    assert len(seen) > 15                                         # most of the 25 shifts occur
    assert random_shift(image, 0) is image


def test_masks_of_every_form_mean_the_same_region():
    """The same 4 x 4 square as a PIL image of any mode (alpha: opaque white only), an array, a 0/1 numeric
    image (modes I and F, read by value) or a channel-first tensor."""
    square = np.zeros((16, 16), dtype=np.uint8)
    square[4:8, 4:8] = 255
    expected = mask_to_tensor(square, (16, 16), 16)
    assert expected.sum() == 16
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 255                                          # white everywhere, opaque only in the square
    rgba[..., 3] = square
    forms = [Image.fromarray(square), Image.fromarray(square).convert("RGB"), Image.fromarray(rgba, "RGBA"),
             Image.fromarray((square > 0).astype(np.int32)), Image.fromarray((square > 0).astype(np.float32)),
             torch.from_numpy(square)[None], Image.fromarray(square).convert("P")]
    for form in forms:
        assert torch.equal(mask_to_tensor(form, (16, 16), 16), expected), form


def test_a_mask_outside_the_centre_crop_is_an_error_and_partly_outside_a_warning(caplog):
    """A 40 x 20 image is cropped to x 10..30: a box at x 32..36 would regenerate nothing."""
    with pytest.raises(ValueError, match=r"outside the centre square .* \(x 10..30, y 0..20 of the 40x20 image\)"):
        mask_to_tensor((32, 5, 36, 9), (40, 20), 10)
    with caplog.at_level("WARNING"):
        m = mask_to_tensor((26, 5, 34, 9), (40, 20), 10)
    assert m.any() and "16 masked pixels lie outside the centre square" in caplog.text


def test_open_image_applies_the_exif_orientation(tmp_path):
    """A phone JPEG stored sideways with Orientation 6 opens as viewers show it."""
    arr = np.zeros((64, 96, 3), dtype=np.uint8)
    arr[:, :48] = (255, 0, 0)                                    # stored: red on the left, 96 wide
    exif = Image.Exif()
    exif[0x0112] = 6                                             # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif)
    opened = open_image(tmp_path / "phone.jpg")
    assert opened.size == (64, 96)                               # displayed: 64 wide, 96 tall
    top, bottom = np.asarray(opened)[:40].mean(axis=(0, 1)), np.asarray(opened)[56:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 60                        # red on top once rotated
