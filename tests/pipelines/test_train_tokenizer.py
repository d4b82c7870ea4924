"""`tessera train-tokenizer` / `reconstruct` end to end on a tiny VQ-GAN (32 px, 8x8 tokens)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipelines.checkpoint import load_checkpoint
from pipelines.cli import main
from pipelines.config import load_sections
from pipelines.train_tokenizer import SECTIONS, TokenizerTask, psnr
from tokenizer import VQGAN

REPO = Path(__file__).resolve().parents[2]
EMOJI_CACHE = REPO / "cache"

TINY = {
    "model": {"resolution": 32, "base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
              "mid_attention": False, "z_channels": 16, "codebook_size": 32, "codebook_dim": 4, "usage_window": 2},
    "loss": {"perceptual_weight": 0.0, "disc_start": 2, "disc_channels": 8,   # LPIPS: tokenizer tests
             "disc_layers": 2, "lecam_weight": 0.1},
    "train": {"batch_size": 4, "max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
              "log_every": 1, "sample_every": 2, "mixed_precision": "no"},
    "data": {"resolution": 32},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs run faster on one thread than fighting over a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """The tiny config on the bundled emoji when their 32 px cache exists, else on a small image folder."""
    root = tmp_path_factory.mktemp("tok")
    cfg = json.loads(json.dumps(TINY))
    if list((EMOJI_CACHE / "emoji").glob("emoji-32px-*.npz")):
        cfg["data"].update(dataset="emoji", cache_dir=str(EMOJI_CACHE))
    else:
        g = torch.Generator().manual_seed(0)
        for cls in ("red", "blue"):
            for split in ("train", "val"):
                (root / "images" / split / cls).mkdir(parents=True)
                for i in range(6):
                    arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                    Image.fromarray(arr).save(root / "images" / split / cls / f"{i}.png")
        cfg["data"]["dataset"] = str(root / "images")
    path = root / "tiny.yaml"
    path.write_text("# tessera train-tokenizer --config tiny.yaml --output DIR\n" + yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(run_config, tmp_path_factory) -> Path:
    """A 4-step run: checkpoints at 2 and 4, sample grids at 2 and 4, metrics every step."""
    out = tmp_path_factory.mktemp("run") / "tok"
    torch.set_num_threads(1)
    assert cli("train-tokenizer", "--config", run_config, "--output", out) == 0
    return out


def test_train_writes_a_loadable_model_dir_checkpoints_samples_and_metrics(trained):
    model = VQGAN.from_pretrained(trained)                 # DIR is a model dir
    ckpt = load_checkpoint(trained / "checkpoints" / "step-0000004")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt.tensors["model"][k]), k
    assert set(ckpt.optimizer_states) == {"model", "disc"} and "disc" in ckpt.tensors
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    with Image.open(trained / "samples" / "step-0000002.png") as im:
        assert im.size[0] < 8 * im.size[1]                 # two rows: inputs, reconstructions
    records = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss/model", "loss/disc", "psnr", "vq/perplexity", "vq/usage", "images_per_s"} <= records[-1].keys()
    assert records[0]["loss/disc"] == 0.0 and records[-1]["disc_loss"] > 0  # GAN starts at disc_start = 2
    assert (trained / "run.yaml").read_text().startswith("# tessera")


def test_resume_continues_from_step_4_to_6(trained, tmp_path, capsys):
    out = tmp_path / "tok"
    shutil.copytree(trained, out)
    assert cli("train-tokenizer", "--output", out, "--resume", "--max-steps", 6) == 0   # config from run.yaml
    assert "done at step 6" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoints" / "step-0000006").state["step"] == 6
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()][4:] == [5, 6]


def test_shipped_tiny_config_trains(tmp_path, capsys):
    """The config as shipped, on the emoji it names: the repository's 32 px cache when it has one, else
    rendered here from the emoji packages (~6 s on the 2-core CI machine)."""
    cache = EMOJI_CACHE if list((EMOJI_CACHE / "emoji").glob("emoji-32px-*.npz")) else tmp_path / "cache"
    assert cli("train-tokenizer", "--config", REPO / "configs" / "tokenizer" / "tiny.yaml",
               "--output", tmp_path / "tok", "--max-steps", 2,
               "--set", "train.batch_size=4", "--set", f"data.cache_dir={cache}") == 0
    assert "done at step 2" in capsys.readouterr().out
    assert VQGAN.from_pretrained(tmp_path / "tok").grid_size == 8


def crash_then_resume(tmp_path, monkeypatch, args, crash_at: int) -> tuple:
    """Run A straight; run B crashes in step ``crash_at`` (after a checkpoint) and resumes."""
    assert cli("train-tokenizer", "--output", tmp_path / "a", *args) == 0
    step_fn = TokenizerTask.train_step

    def crash(self, batch, step):
        if step == crash_at:
            raise RuntimeError("simulated crash")
        return step_fn(self, batch, step)

    monkeypatch.setattr(TokenizerTask, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli("train-tokenizer", "--output", tmp_path / "b", *args)
    monkeypatch.setattr(TokenizerTask, "train_step", step_fn)
    assert cli("train-tokenizer", "--output", tmp_path / "b", "--resume", *args) == 0
    return tuple(load_checkpoint(sorted((tmp_path / d / "checkpoints").iterdir())[-1]) for d in "ab")


def assert_groups_equal(a, b, groups):
    for group in groups:
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)


def test_resume_is_exact_with_gan_lecam_ema_and_code_restarts(run_config, tmp_path, monkeypatch):
    args = ["--config", run_config, "--max-steps", 8, "--set", "train.ema_decay=0.9", "--set", "train.sample_every=0"]
    a, b = crash_then_resume(tmp_path, monkeypatch, args, crash_at=4)   # resumes from the step-4 checkpoint
    records = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["vq/restarted"] for r in records if r["step"] > 4) > 0   # dead codes restarted after the resume
    assert a.step == b.step == 8
    assert_groups_equal(a, b, ("model", "disc", "ema", "model.buffers"))  # buffers: codebook usage counters
    assert a.tensors["disc"]["loss.lecam_updates"].item() == 6     # LeCam EMAs live in the checkpoint
    saved = VQGAN.from_pretrained(tmp_path / "b")         # the model dir holds the EMA weights
    assert all(torch.equal(v, b.tensors["ema"][k]) for k, v in saved.state_dict().items())


def test_reconstruct_any_image(trained, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.new("LA", (50, 40), (90, 128)).save(src)        # grey + alpha, not square, not 32 px
    assert cli("reconstruct", "--tokenizer", trained, "--image", src, "--out", tmp_path / "rec.png") == 0
    assert "PSNR" in capsys.readouterr().out
    with Image.open(tmp_path / "rec.png") as im:
        assert im.size == (64, 32) and im.mode == "RGB"   # input | reconstruction


def test_user_errors_are_one_line(run_config, tmp_path, capsys):
    assert cli("train-tokenizer", "--config", run_config, "--output", tmp_path, "--set", "data.resolution=64") == 2
    assert "error: data.resolution 64 differs from model.resolution 32" in capsys.readouterr().err
    assert cli("train-tokenizer", "--output", tmp_path / "new") == 2
    assert "give --config (or --resume an output dir that has a run.yaml)" in capsys.readouterr().err
    assert cli("train-tokenizer", "--config", run_config, "--output", tmp_path, "--set", "train.bogus=1") == 2
    assert "unknown key 'train.bogus'" in capsys.readouterr().err


def test_psnr_formula():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full_like(x, 0.2)                          # 0.1 apart on [0, 1]: mse 0.01 -> 20 dB
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "tokenizer").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_tokenizer_configs_load(path):
    sections = load_sections(path, SECTIONS)
    assert sections["data"].resolution == sections["model"].resolution
