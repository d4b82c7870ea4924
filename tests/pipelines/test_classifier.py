import hashlib
import json
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from pipelines.classifier import (AugmentConfig, ClassifierConfig, EmojiClassifier, accuracy_report, augment,
                                  train_classifier)
from pipelines.data import DataConfig
from pipelines.train_utils import exit_status
from pipelines.trainer import TrainConfig
from tests.pipelines.test_trainer import sigterm_once_exists

TINY = dict(arch="resnet10t", channels=(8, 8, 8, 8), stem_width=8, drop_rate=0.0, resolution=16)


class Colours(Dataset):
    """Class c = a noisy square of colour channel c on white: trivially separable."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.ones(n, 3, 16, 16)
        for i, c in enumerate(self.labels.tolist()):
            self.images[i, :, 4:12, 4:12] = -1.0
            self.images[i, c, 4:12, 4:12] = 1.0
        self.images = (self.images + 0.1 * torch.randn(self.images.shape, generator=g)).clamp(-1, 1)
        self.class_names = ["red", "green", "blue"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def tiny_model(**kw) -> EmojiClassifier:
    return EmojiClassifier(ClassifierConfig(**TINY, num_classes=3, class_names=("a", "b", "c"), **kw))


def test_features_and_logits_shapes():
    model = tiny_model().eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert model.features(x).shape == (4, 8)
    assert model.logits(x).shape == (4, 3)
    assert model.features(torch.rand(2, 3, 24, 24)).shape == (2, 8)        # other sizes are resized
    with pytest.raises(ValueError, match="expected images"):
        model.features(torch.rand(2, 16, 16))


def test_config_errors():
    with pytest.raises(ValueError, match="num_classes"):
        EmojiClassifier(ClassifierConfig(**TINY))
    with pytest.raises(ValueError, match="unknown timm architecture"):
        EmojiClassifier(ClassifierConfig(**dict(TINY, arch="no-such-net"), num_classes=2))
    with pytest.raises(ValueError, match="class names"):
        ClassifierConfig(num_classes=2, class_names=("a",))


@pytest.mark.parametrize("kw", [dict(label_smoothing=1.5), dict(scale_range=-1.0), dict(max_shift=0.5)])
def test_augment_config_refuses_impossible_values(kw):
    with pytest.raises(ValueError, match=f"augment.{next(iter(kw))} must be in"):
        AugmentConfig(**kw)


def test_augment_is_seeded_and_identity_without_range():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    aug = AugmentConfig(max_shift=0.1, scale_range=0.1)
    a = augment(x, aug, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment(x, aug, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, x)
    assert torch.allclose(augment(x, AugmentConfig(0.0, 0.0)), x, atol=1e-5)


def test_save_load_identical(tmp_path):
    model = tiny_model().eval()
    model.save(tmp_path / "clf")
    loaded = EmojiClassifier.from_pretrained(tmp_path / "clf")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(model.features(x), loaded.features(x))
    assert loaded.feature_space == model.feature_space and loaded.feature_space.startswith("tessera-emoji-classifier ")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "model.safetensors"]
    file_hash = hashlib.sha256((tmp_path / "clf" / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.fingerprint() == file_hash == model.fingerprint()   # the feature-space label names the file
    half = {k: v.half() for k, v in load_file(str(tmp_path / "clf" / "model.safetensors")).items()}
    (tmp_path / "clf16").mkdir()
    save_file(half, str(tmp_path / "clf16" / "model.safetensors"))
    (tmp_path / "clf16" / "config.json").write_text((tmp_path / "clf" / "config.json").read_text())
    loaded16 = EmojiClassifier.from_pretrained(tmp_path / "clf16")      # a 16-bit copy loads, as another space
    assert loaded16.feature_space != loaded.feature_space
    assert torch.allclose(loaded16.features(x), loaded.features(x), atol=1e-2)


def test_train_few_steps_then_reload(tmp_path):
    train = TrainConfig(batch_size=12, max_steps=25, lr=3e-3, warmup_steps=2, log_every=5, checkpoint_every=0,
                        mixed_precision="no")
    data = DataConfig(dataset=str(tmp_path / "unused"), resolution=16)
    out = tmp_path / "run"
    report = train_classifier(ClassifierConfig(**TINY), AugmentConfig(), train, data, out,
                              train_set=Colours(48, 0), val_set=Colours(12, 1))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == report and report["steps"] == 25
    assert set(report["val"]["per_class"]) == {"red", "green", "blue"}
    assert report["val"]["balanced_accuracy"] == pytest.approx(sum(report["val"]["per_class"].values()) / 3)
    assert report["val"]["accuracy"] >= 0.66                     # colours: learnt within a few steps
    model = EmojiClassifier.from_pretrained(out)
    assert model.config.num_classes == 3 and model.config.class_names == ("red", "green", "blue")
    assert report["feature_space"] == model.feature_space
    assert accuracy_report(model, Colours(12, 1)) == report["val"]
    x = Colours(4, 2).images
    assert torch.equal(model.features(x), EmojiClassifier.from_pretrained(out).features(x))
    torch.manual_seed(123)                                       # the global RNG state does not matter
    train_classifier(ClassifierConfig(**TINY), AugmentConfig(), train, data, tmp_path / "again",
                     train_set=Colours(48, 0), val_set=Colours(12, 1))
    again = EmojiClassifier.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_sigterm_stops_with_a_checkpoint_and_no_val_report(tmp_path, capsys, caplog):
    """A signal is not a finished run: no val pass over the unfinished model, no metrics.json, the CLI's 143."""
    out = tmp_path / "run"
    train = TrainConfig(batch_size=12, max_steps=100000, lr=3e-3, warmup_steps=2, log_every=5, checkpoint_every=5,
                        mixed_precision="no")
    with sigterm_once_exists(out / "checkpoints" / "step-0000005"):
        report = train_classifier(ClassifierConfig(**TINY), AugmentConfig(), train,
                                  DataConfig(dataset=str(tmp_path / "unused"), resolution=16), out,
                                  train_set=Colours(48, 0), val_set=Colours(12, 1))
    stopped = report["stopped"]
    assert stopped["signal"] == signal.SIGTERM and exit_status(stopped) == 143
    assert 5 <= stopped["step"] < 100000 and (out / "checkpoints" / f"step-{stopped['step']:07d}").is_dir()
    assert not (out / "metrics.json").exists()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped by SIGTERM")]
    assert len(said) == 1 and said[0].startswith(f"stopped by SIGTERM at step {stopped['step']};")   # by the Trainer
    assert "stopped by" not in capsys.readouterr().err
