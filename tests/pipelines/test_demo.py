"""`tessera demo` end to end on tiny untrained models laid out like checkpoints/ (val emoji stubbed by
random images so the test does not render the emoji set)."""
import numpy as np
import pytest
from PIL import Image

import pipelines.demo as demo
from pipelines.cli import main
from pipelines.loading import write_meta
from tests.pipelines.test_generate import make_generator_dir
from tests.pipelines.test_train_generator import make_tokenizer

NAMES = [f"class {i}" for i in range(9)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    vq, ms = make_tokenizer(root / "tokenizer"), make_tokenizer(root / "msvq", multiscale=True)
    for kind, tok in (("masked", vq), ("ar", vq), ("var", ms)):
        path = make_generator_dir(root / kind, kind, tok, num_classes=9)
        write_meta(path, tok.fingerprint(), NAMES, {"grid_size": tok.grid_size})
    return root


def test_demo_writes_every_stage(checkpoints, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    fake = lambda resolution, count: [(Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)),
                                       i % 9) for i in range(count)]
    monkeypatch.setattr(demo, "val_examples", fake)
    out = tmp_path / "demo"
    assert main(["demo", "--checkpoints", str(checkpoints), "--out", str(out), "--per-class", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("reconstruction", "samples-masked", "samples-ar", "samples-var", "inpainting"):
        assert (out / f"{name}.png").is_file() and f"{out}/{name}.png" in printed
    with Image.open(out / "inpainting.png") as im:       # 4 rows of input, masked input, 3 samples at 64 px view
        assert im.size == (5 * (64 + 2) + 2, 4 * (64 + 2) + 2)


def test_brush_mask_is_deterministic_and_not_empty():
    a, b = np.asarray(demo.brush_mask(32, 1)), np.asarray(demo.brush_mask(32, 1))
    assert np.array_equal(a, b) and 0 < (a > 0).mean() < 0.8
    assert not np.array_equal(a, np.asarray(demo.brush_mask(32, 2)))


def test_a_missing_checkpoints_folder_is_named_not_replaced_by_the_tiny_demo(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert main(["demo", "--checkpoints", str(missing), "--out", str(tmp_path / "demo")]) == 2
    assert f"checkpoints folder not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
