"""`tessera evaluate` end to end on tiny artefacts made here: an ImageFolder of 16 px images, an untrained
VQGAN (vq and multiscale), an untrained tiny classifier and masked generator."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from generator.config import GeneratorConfig
from generator.masked import MaskedGenerator
from pipelines import evaluate as E
from pipelines import metrics as M
from pipelines.classifier import ClassifierConfig, EmojiClassifier
from pipelines.loading import write_meta
from tokenizer.vqgan import VQGAN, VQGANConfig

CLASSES = ["blue", "green", "red"]           # ImageFolder order (sorted)
TOK = dict(resolution=16, base_channels=8, num_res_blocks=1, mid_attention=False, z_channels=8, codebook_dim=4)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(CLASSES):
            (root / "images" / split / name).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                arr[4:12, 4:12, 2 - c] = 255
                Image.fromarray(arr).save(root / "images" / split / name / f"{i}.png")
    torch.manual_seed(0)
    tok = VQGAN(VQGANConfig(**TOK, channel_mult=(1, 2), codebook_size=64)).eval()
    tok.save(root / "tok")
    VQGAN(VQGANConfig(**TOK, channel_mult=(1, 2, 2), codebook_size=32, quantizer="multiscale",
                      scales=(1, 2, 4))).save(root / "tok-ms")
    EmojiClassifier(ClassifierConfig(arch="resnet10t", channels=(8, 8, 8, 8), stem_width=8, resolution=16,
                                     num_classes=3, class_names=tuple(CLASSES), dataset=str(root / "images"))
                    ).save(root / "clf")
    gen = MaskedGenerator(GeneratorConfig(kind="masked", codebook_size=64, grid_size=8, num_classes=3, dim=32,
                                          depth=2, heads=2))
    gen.save(root / "gen")
    write_meta(root / "gen", tok.fingerprint(), CLASSES, {"codebook_size": 64, "grid_size": 8, "scales": []})
    return root


@pytest.fixture(autouse=True)
def no_downloaded_weights(tmp_path, monkeypatch):
    """Whatever this machine caches, the tests see no LPIPS / Inception weights."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("TESSERA_INCEPTION_WEIGHTS", raising=False)


def _finite_numbers(x):
    if isinstance(x, dict):
        return all(_finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite_numbers(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def _cli(argv):
    parser = argparse.ArgumentParser()
    E.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_cli_end_to_end(art, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = _cli(["evaluate", "--tokenizer", str(art / "tok"), "--generator", str(art / "gen"),
               "--classifier", str(art / "clf"), "--data", str(art / "images"), "--num-samples", "12",
               "--num-steps", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert _finite_numbers(res)
    space = EmojiClassifier.from_pretrained(art / "clf").feature_space
    assert space.startswith("tessera-images-classifier ")
    rec = res["reconstruction"]
    assert rec["num_images"] == 12 and 0 < rec["ssim"] <= 1 and rec["psnr"] > 0
    assert rec["lpips"] == "unavailable (no VGG weights)"
    assert 0 < rec["codebook"]["usage"] <= 1 and 1 <= rec["codebook"]["perplexity"] <= 64
    assert rec["classifier"]["feature_space"] == space and rec["classifier"]["frechet_distance"] >= 0
    assert rec["inception"] is None and res["inception"].startswith("unavailable: no Inception weights")
    gen = res["generation"]
    assert gen["num_samples"] == 12 and gen["images_per_s"] > 0 and gen["generator"]["kind"] == "masked"
    for group in (gen["classifier"], gen["real_floor"]):
        assert group["feature_space"] == space and group["n_real"] == 12 and group["n_fake"] == 12
        assert "[4, 4, 4]" in group.get("what", gen["reference"])
        assert group["frechet_distance"] >= 0
        assert all(0 <= group[k] <= 1 for k in ("precision", "recall", "class_accuracy"))
    assert set(res["timings_s"]) >= {"load", "reconstruction", "generation_sampling", "reference_features"}
    table = capsys.readouterr().out
    assert "PSNR" in table and f"[{space}]" in table and "LPIPS            unavailable (no VGG weights)" in table
    assert "FID" not in table.replace("Inception FID/IS: unavailable", "")   # no FID label on classifier numbers


def test_multiscale_codebook_stats_per_scale(art):
    res = E.evaluate(art / "tok-ms", str(art / "images"), config=E.EvalConfig(batch_size=8), device="cpu",
                     extractor=None)
    per_scale = res["reconstruction"]["codebook"]["per_scale"]
    assert [s["side"] for s in per_scale] == [1, 2, 4]
    assert per_scale[0]["usage"] <= 1 / 32 + 1e-9         # one code per image at the 1x1 scale, 12 images
    assert "classifier" not in res["reconstruction"] and res["inception"] == "unavailable: disabled (--no-inception)"


class StubFeatures(torch.nn.Module):
    """Stands in for Inception: uint8 images -> per-channel mean and std (6 features)."""
    num_features = 6

    def forward(self, u8):
        x = u8.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_inception_path_with_a_stub_is_labelled_as_the_stub(art):
    stub = M.Extractor("stub-extractor (test only)", StubFeatures(), StubFeatures())
    res = E.evaluate(art / "tok", str(art / "images"), art / "gen", art / "clf",
                     E.EvalConfig(num_samples=12, num_steps=2, batch_size=8), "cpu", extractor=stub)
    assert res["inception"] == "stub-extractor (test only)"
    for where in (res["reconstruction"], res["generation"]):
        assert where["inception"]["extractor"] == "stub-extractor (test only)"
        assert math.isfinite(where["inception"]["fid"])
    assert math.isfinite(res["generation"]["inception"]["inception_score"])
    assert "[stub-extractor (test only)]" in E.format_table(res)


def test_torchmetrics_fid_agrees_with_our_frechet_distance():
    real, fake = torch.rand(20, 3, 8, 8) * 2 - 1, torch.rand(20, 3, 8, 8) * 1.5 - 0.5
    fid = M.TorchmetricsFID(M.Extractor("stub", StubFeatures()))
    fid.update(real, real=True), fid.update(fake, real=False)
    net = StubFeatures()
    ours = M.frechet_distance_features(net(M.to_uint8(real)), net(M.to_uint8(fake)))
    assert fid.compute()["fid"] == pytest.approx(ours, rel=1e-3)


def test_user_errors(art):
    with pytest.raises(ValueError, match="num_samples"):
        E.EvalConfig(num_samples=3)
    other = art / "clf-other"
    EmojiClassifier(ClassifierConfig(arch="resnet10t", channels=(8, 8, 8, 8), stem_width=8, resolution=16,
                                     num_classes=3, class_names=("a", "b", "c"))).save(other)
    with pytest.raises(ValueError, match="trained on classes"):
        E.evaluate(art / "tok", str(art / "images"), classifier_dir=other, device="cpu", extractor=None)


def test_a_generator_of_another_tokenizer_fails_before_the_reconstruction_pass(art, monkeypatch):
    ran = []
    monkeypatch.setattr(E, "reconstruction_metrics", lambda *a, **k: ran.append(1) or {})
    with pytest.raises(ValueError, match="codebook sizes differ"):     # gen: 64 codes, grid 8; tok-ms: 32 codes
        E.evaluate(art / "tok-ms", str(art / "images"), generator_dir=art / "gen", device="cpu", extractor=None)
    assert ran == []


def test_class_quota_water_fills():
    assert E.class_quota(torch.tensor([90, 10]), 16).tolist() == [8, 8]
    assert E.class_quota(torch.tensor([90, 10]), 60).tolist() == [50, 10]      # the small class gives all it has
    assert E.class_quota(torch.tensor([90, 10]), 500).tolist() == [90, 10]
    assert E.class_quota(torch.tensor([5, 5, 5]), 10).tolist() == [3, 3, 4]
    assert E.class_quota(torch.tensor([3, 10, 4]), 15).tolist() == [3, 8, 4]
    assert E.class_quota(torch.tensor([0, 7]), 4).tolist() == [0, 4]


def test_draw_by_class_is_distinct_seeded_and_follows_the_quota():
    labels = torch.tensor([0] * 90 + [1] * 10)
    idx = E.draw_by_class(labels, torch.tensor([8, 8]), torch.Generator().manual_seed(0))
    assert len(set(idx)) == 16 and torch.bincount(labels[idx]).tolist() == [8, 8]
    assert idx == E.draw_by_class(labels, torch.tensor([8, 8]), torch.Generator().manual_seed(0))
