"""Config text -> values: exponent floats without a dot are floats (YAML 1.2), in files and in --set."""
import pytest

from pipelines.config import ConfigError, load_sections, parse_overrides, parse_yaml
from pipelines.train_utils import TrainConfig


def test_exponent_floats_without_a_dot_are_floats():
    got = parse_yaml("a: 3e-4\nb: 1E5\nc: -2.5e-3\nd: 1.0e-9\ne: 1_000e-3\nf: 10\ng: 0x10")
    assert got == {"a": 3e-4, "b": 1e5, "c": -2.5e-3, "d": 1e-9, "e": 1.0, "f": 10, "g": 16}
    assert all(type(got[k]) is float for k in "abcde")
    strings = parse_yaml("a: 1e\nb: e5\nc: 1.2.3\nd: '3e-4'\ne: v1e5")   # not numbers, or quoted: strings
    assert strings == {"a": "1e", "b": "e5", "c": "1.2.3", "d": "3e-4", "e": "v1e5"}
    assert parse_overrides(["train.lr=1e-4", "train.max_minutes=2e-2"]) == {"train": {"lr": 1e-4, "max_minutes": 0.02}}


def test_a_config_file_and_overrides_with_exponent_floats_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  max_minutes: 1e1\n")
    train = load_sections(path, {"train": TrainConfig}, overrides=["train.min_lr_ratio=5e-2"])["train"]
    assert (train.lr, train.max_minutes, train.min_lr_ratio) == (3e-4, 10.0, 0.05)
    path.write_text("train:\n  lr: 3e-4x\n")
    with pytest.raises(ConfigError, match="train.lr: expected a number, got '3e-4x'"):
        load_sections(path, {"train": TrainConfig})


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_by_name(value):
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_sections(None, {"train": TrainConfig}, overrides=[f"train.lr={value}"])


def test_a_key_given_twice_is_an_error_naming_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  batch_size: 8\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(line 4, column 3\)"):
        load_sections(path, {"train": TrainConfig})
