"""`tessera tokenize` and `tessera train-generator` end to end on tiny artefacts made here: a tiny
(untrained) VQGAN and a multiscale one, token caches of a synthetic 3-class dataset."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Dataset

from pipelines import cli
from pipelines.data import TokenDataset, tokenize_dataset
from pipelines.loading import load_generator_dir
from tests.pipelines.test_trainer import sigterm_once_exists
from tokenizer.vqgan import VQGAN, VQGANConfig

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["red", "green", "blue"]
TOK = dict(resolution=16, base_channels=8, num_res_blocks=1, mid_attention=False, z_channels=8, codebook_dim=4)
MODEL = dict(dim=32, depth=2, heads=2, class_dropout=0.1)
TRAIN = dict(batch_size=8, max_steps=4, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1, seed=0)


class ColourData(Dataset):
    """Random 16x16 images tinted by class: items (image (3, 16, 16) in [-1, 1], label)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % len(CLASSES)
        tint = torch.eye(3)[self.labels][:, :, None, None]
        self.images = (0.5 * torch.rand(n, 3, 16, 16, generator=g) + tint - 0.5).clamp(-1, 1)
        self.class_names = list(CLASSES)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def make_tokenizer(path: Path, multiscale: bool = False, **kw) -> VQGAN:
    """vq: 16 px -> 8x8 grid of 64 codes; multiscale: 16 px -> scales (1, 2, 4) of 32 codes."""
    torch.manual_seed(0)
    if multiscale:
        config = VQGANConfig(**TOK, channel_mult=(1, 2, 2), codebook_size=32, quantizer="multiscale",
                             scales=(1, 2, 4), **kw)
    else:
        config = VQGANConfig(**{**TOK, **kw}, channel_mult=(1, 2), codebook_size=64)
    tokenizer = VQGAN(config).eval()
    tokenizer.save(path)
    return tokenizer


def make_tokens(tokenizer: VQGAN, path: Path) -> Path:
    """TOKENS/train (24 images + flips) and TOKENS/val (6 images), the `tessera tokenize` layout."""
    tokenize_dataset(tokenizer, ColourData(24, 1), path / "train", batch_size=8, flips=True)
    tokenize_dataset(tokenizer, ColourData(6, 2), path / "val", batch_size=8, flips=False)
    return path


def tokens_shape(tokenizer: VQGAN) -> dict:
    c = tokenizer.config
    shape = {"codebook_size": c.codebook_size, "grid_size": c.grid_size, "num_classes": len(CLASSES)}
    if tokenizer.is_multiscale:
        shape.update(scales=list(c.scales), codec_dim=c.codebook_dim)
    return shape


def write_config(path: Path, kind: str, tokenizer: VQGAN, **model) -> Path:
    config = {"model": {"kind": kind, **MODEL, **tokens_shape(tokenizer), **model}, "train": dict(TRAIN)}
    path.write_text(f"# tessera train-generator --config {path.name}\n" + yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True, scope="module")
def _tiny_cpu():
    """Tiny tensors: oneDNN builds a kernel per conv shape (0.1-0.7 s each), and intra-op threads only
    add sync overhead (10x slower on a busy machine), so run these tests single-threaded without it."""
    enabled, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.backends.mkldnn.enabled = enabled
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    vq, ms = make_tokenizer(root / "tok"), make_tokenizer(root / "tok-ms", multiscale=True)
    other = make_tokenizer(root / "tok-other", base_channels=16)          # same codebook and grid, other hash
    return {"root": root, "vq": vq, "ms": ms, "other": other,
            "tokens": make_tokens(vq, root / "tokens"), "tokens_ms": make_tokens(ms, root / "tokens-ms"),
            "tokens_other": make_tokens(other, root / "tokens-other")}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def train(capsys, art, kind: str, out: Path, *extra, tokens=None, tokenizer=None) -> str:
    tok = tokenizer or ("tok-ms" if kind == "var" else "tok")
    cfg = write_config(art["root"] / f"{kind}-tiny.yaml", kind, art["ms" if kind == "var" else "vq"])
    tokens = tokens or art["tokens_ms" if kind == "var" else "tokens"]
    code, stdout, err = run_cli(capsys, "train-generator", "--config", cfg, "--tokens", tokens, "--output", out,
                                "--tokenizer", art["root"] / tok, *extra)
    assert code == 0, err
    return stdout


def test_tokenize_cli_writes_train_and_val(tmp_path, capsys, art):
    for split, n in (("train", 4), ("val", 2)):
        for c in CLASSES:
            (tmp_path / "images" / split / c).mkdir(parents=True)
            for i in range(n):
                arr = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "images" / split / c / f"{i}.png")
    code, out, err = run_cli(capsys, "tokenize", "--tokenizer", art["root"] / "tok", "--data", tmp_path / "images",
                             "--output", tmp_path / "tokens", "--batch-size", "5")
    assert code == 0, err
    train, val = TokenDataset(tmp_path / "tokens" / "train"), TokenDataset(tmp_path / "tokens" / "val")
    assert (len(train), len(val)) == (24, 6)                                  # train has the mirror images too
    assert train.info.class_names == sorted(CLASSES) and train.info.seq_len == 64   # folder order
    train.check_tokenizer(art["vq"])
    assert "train: 24 token sequences" in out
    msg = user_error(capsys, "tokenize", "--tokenizer", art["root"] / "tok", "--data", tmp_path / "images",
                     "--output", tmp_path / "t2", "--resolution", "32")
    assert "--resolution 32" in msg


@pytest.mark.parametrize("kind", ["masked", "ar", "var"])
def test_train_generator_writes_a_loadable_dir(tmp_path, capsys, art, kind):
    out = tmp_path / kind
    stdout = train(capsys, art, kind, out, "--set", "train.sample_every=4")
    assert f"trained a {kind} generator to step 4" in stdout and "bits per token" in stdout
    gen = load_generator_dir(out, "cpu")
    assert gen.model.config.kind == kind and not gen.model.training
    meta = json.loads((out / "meta.json").read_text())
    tok = art["ms" if kind == "var" else "vq"]
    assert meta["tokenizer_hash"] == tok.fingerprint() and meta["class_names"] == CLASSES
    assert meta["tokens"]["num_train"] == 48 and meta["tokens"]["num_val"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/bits_per_token" in r]
    assert [r["step"] for r in val] == [2, 4]                                  # every checkpoint + the final model
    assert all(0 < r["val/bits_per_token"] < 10 for r in val)
    assert any("tokens_per_s" in r for r in records)
    assert (out / "samples" / "step-0000004.png").is_file()
    run_yaml = yaml.safe_load((out / "run.yaml").read_text())
    assert run_yaml["model"]["kind"] == kind and run_yaml["train"]["max_steps"] == 4


def test_resume_continues_to_the_same_weights(tmp_path, capsys, art):
    train(capsys, art, "ar", tmp_path / "straight")
    train(capsys, art, "ar", tmp_path / "resumed", "--max-steps", "2")
    stdout = train(capsys, art, "ar", tmp_path / "resumed", "--resume")
    assert "to step 4" in stdout
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/bits_per_token" in r] == [2, 4]   # step 2's validation once
    msg = user_error(capsys, "train-generator", "--config", art["root"] / "ar-tiny.yaml", "--tokens", art["tokens"],
                     "--output", tmp_path / "straight")
    assert "--resume" in msg                                                   # no silent overwrite


def stopped_lines(caplog, err: str, signal_name: str) -> list[str]:
    """The Trainer's "stopped by" line(s) (logged), after checking the CLI printed no plain copy of its own."""
    assert not [ln for ln in err.splitlines() if ln.startswith("stopped by")], err
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"stopped by {signal_name} at step")]


def test_a_sigterm_exits_143_after_its_checkpoint_and_the_run_resumes(tmp_path, capsys, caplog, art):
    """A signal is not a finished run: `train && evaluate` must not go on. The checkpoint is written, no
    validation pass delays the exit, and --resume continues from the step where it stopped."""
    out = tmp_path / "stopped"
    cfg = write_config(art["root"] / "masked-tiny.yaml", "masked", art["vq"])
    with sigterm_once_exists(out / "checkpoints" / "step-0000002"):
        code, stdout, err = run_cli(capsys, "train-generator", "--config", cfg, "--tokens", art["tokens"],
                                    "--output", out, "--max-steps", "100000")
    assert code == 128 + signal.SIGTERM, err
    line = stopped_lines(caplog, err, "SIGTERM")
    assert len(line) == 1 and "--resume" in line[0] and "Traceback" not in err
    step = int(line[0].split("at step ")[1].split(";")[0])
    assert 2 <= step < 100000 and (out / "checkpoints" / f"step-{step:07d}").is_dir()
    assert "trained a masked generator" not in stdout                  # no validation pass after the signal
    code, stdout, err = run_cli(capsys, "train-generator", "--config", cfg, "--tokens", art["tokens"],
                                "--output", out, "--max-steps", str(step + 2), "--resume")
    assert code == 0, err
    assert f"to step {step + 2}" in stdout


def test_tokens_from_another_tokenizer_are_refused(tmp_path, capsys, art):
    cfg = write_config(tmp_path / "m.yaml", "masked", art["vq"])
    msg = user_error(capsys, "train-generator", "--config", cfg, "--tokens", art["tokens_other"],
                     "--output", tmp_path / "x", "--tokenizer", art["root"] / "tok")
    assert art["vq"].fingerprint() in msg and art["other"].fingerprint() in msg
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_config_that_does_not_fit_the_tokens_is_refused(tmp_path, capsys, art):
    cfg = write_config(tmp_path / "m.yaml", "masked", art["vq"], codebook_size=32, num_classes=9)
    msg = user_error(capsys, "train-generator", "--config", cfg, "--tokens", art["tokens"], "--output", tmp_path / "x")
    assert "--set model.codebook_size=64" in msg and "--set model.num_classes=3" in msg
    msg = user_error(capsys, "train-generator", "--config", cfg, "--tokens", art["tokens_ms"],
                     "--output", tmp_path / "x")
    assert "single-scale" in msg
    var_cfg = write_config(tmp_path / "v.yaml", "var", art["ms"])
    msg = user_error(capsys, "train-generator", "--config", var_cfg, "--tokens", art["tokens_ms"],
                     "--output", tmp_path / "x")
    assert "--tokenizer" in msg
    msg = user_error(capsys, "train-generator", "--config", cfg, "--tokens", tmp_path / "nope", "--output", tmp_path)
    assert str(tmp_path / "nope") in msg
    msg = user_error(capsys, "train-generator", "--config", cfg, "--tokens", art["tokens"], "--output", tmp_path,
                     "--set", "model.depht=3")
    assert "depht" in msg and "depth" in msg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "generator").glob("*-tiny.yaml")))
def test_shipped_tiny_configs_train(tmp_path, capsys, art, name):
    """The repo's tiny configs, pointed at this file's tokens by --set, train and save."""
    kind = yaml.safe_load((REPO / "configs" / "generator" / name).read_text())["model"]["kind"]
    tok = art["ms" if kind == "var" else "vq"]
    sets = [f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in tokens_shape(tok).items()]
    sets += ["train.batch_size=8", "train.warmup_steps=1", "train.sample_every=0"]
    code, _, err = run_cli(capsys, "train-generator", "--config", REPO / "configs" / "generator" / name,
                           "--tokens", art["tokens_ms" if kind == "var" else "tokens"], "--output", tmp_path / "run",
                           "--tokenizer", art["root"] / ("tok-ms" if kind == "var" else "tok"), "--max-steps", "2",
                           *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    assert load_generator_dir(tmp_path / "run", "cpu").model.config.kind == kind
