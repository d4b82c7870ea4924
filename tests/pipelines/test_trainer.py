"""Trainer on a toy task (two tiny regressors, one with dropout, a dataset with random augmentation):
LR schedule, data order, non-finite handling, EMA, exact resume in-process and across SIGKILL, SIGTERM."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pipelines.checkpoint import CheckpointError, load_checkpoint, load_model_dir, save_model_dir
from pipelines.sampler import ResumableBatchSampler, SeededDataset
from pipelines.train_utils import (TIME_LIMIT, StopVote, clip_divisor, code_signum, exit_status, extra_buffers,
                                   signal_code)
from pipelines.trainer import EMA, TrainConfig, Trainer, adamw, lr_factor

REPO = Path(__file__).resolve().parents[2]


class ToyData(Dataset):
    """y = x . w + noise; __getitem__ adds a random jitter from the global RNG (like a random flip)."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(4), self.y[i]


class ToyTask:
    """Two modules, two optimizers, two losses (like a GAN's generator and discriminator)."""
    throughput_unit = "samples"

    def __init__(self, nan_steps=(), crash_at: int | None = None, sleep: float = 0.0, width: int = 16,
                 inf_grad_steps=()):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 1))
        self.aux = nn.Linear(4, 1)
        self.nan_steps, self.crash_at, self.sleep = set(nan_steps), crash_at, sleep
        self.inf_grad_steps = set(inf_grad_steps)
        self.net, self.aux_net = self.model, self.aux

    def modules(self):
        return {"model": self.model, "aux": self.aux}

    def bind_modules(self, prepared):
        self.net, self.aux_net = prepared["model"], prepared["aux"]

    def optimizers(self, train):
        self.opts = {"model": adamw(self.model, train), "aux": adamw(self.aux, train, lr=train.lr * 0.5)}
        return self.opts

    def train_step(self, batch, step):
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        if self.sleep:
            time.sleep(self.sleep)
        x, y = batch
        pred = self.net(x).squeeze(-1)
        loss = F.mse_loss(pred, y)
        if step in self.nan_steps:
            loss = loss * float("nan")
        if step in self.inf_grad_steps:        # a finite loss (+ 0) whose gradient is inf: d sqrt(x) / dx at 0
            loss = loss + torch.sqrt(self.net[0].weight.sum() * 0)
        self.metrics = {"mae": (pred - y).abs().mean().detach()}
        return {"model": loss, "aux": F.mse_loss(self.aux_net(x).squeeze(-1), y)}

    def save_model(self, out_dir, modules):
        save_model_dir(out_dir, {"kind": "toy"}, modules["model"].state_dict())


class FusedToyTask(ToyTask):
    """ToyTask with fused AdamW (what ``adamw`` builds on CUDA): the Trainer's sync-free skip path, and its clip
    inside the optimizer's kernel."""
    fused = True

    def optimizers(self, train):
        self.opts = {name: torch.optim.AdamW(m.parameters(), lr=train.lr * scale, fused=self.fused or None)
                     for name, m, scale in (("model", self.model, 1.0), ("aux", self.aux, 0.5))}
        return self.opts


class UnfusedToyTask(FusedToyTask):
    """FusedToyTask's optimizers unfused: the Trainer clips with clip_grad_norm_ and syncs to skip a step."""
    fused = False


class ChannelsLastTask(FusedToyTask):
    """A conv model whose ``compile_modules`` makes it channels_last (as the tokenizer's does), trained by
    fused AdamW: resuming must give Adam's moments the parameters' layout again."""

    def __init__(self, **kw):
        super().__init__(**kw)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 18), nn.Unflatten(1, (2, 3, 3)), nn.Conv2d(2, 3, 3, padding=1),
                                   nn.Flatten(), nn.Linear(27, 1))
        self.net = self.model

    def compile_modules(self):
        self.model.to(memory_format=torch.channels_last)


def config(**kw) -> TrainConfig:
    base = dict(batch_size=8, max_steps=12, lr=1e-2, warmup_steps=3, checkpoint_every=4, log_every=2,
                grad_clip=1.0, keep_checkpoints=2)
    return TrainConfig(**{**base, **kw})


def train(out, task=None, resume=False, data=None, **kw) -> dict:
    return Trainer(config(**kw), out, task or ToyTask(), data or ToyData(), resume=resume,
                   run_config={"model": {"width": 16}, "train": {}}).fit()


def final_weights(out) -> dict[str, torch.Tensor]:
    return load_checkpoint(sorted((Path(out) / "checkpoints").iterdir())[-1]).tensors["model"]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ config and schedule
@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size"), ({"max_steps": -1}, "max_steps"), ({"lr": 0.0}, "lr"),
    ({"grad_accum": 0}, "grad_accum"), ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"distributed": "deepspeed"}, "distributed"), ({"batch_size": 6, "grad_accum": 4}, "divisible"),
    ({"ema_decay": 1.0}, "ema_decay"), ({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"betas": (0.9, 1.0)}, "betas"),
])
def test_train_config_rejects_impossible_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_lr_schedule_formula():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(4, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)


def test_trainer_applies_schedule_to_every_optimizer(tmp_path):
    task = ToyTask()
    train(tmp_path, task, max_steps=6, log_every=1)
    cfg = config(max_steps=6)
    for name, base in (("model", 1e-2), ("aux", 5e-3)):  # lr set for the last update (step index 5)
        for group in task.opts[name].param_groups:
            assert group["lr"] == pytest.approx(base * lr_factor(5, cfg))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        assert r["lr"] == pytest.approx(1e-2 * lr_factor(r["step"] - 1, cfg))
        assert {"loss/model", "loss/aux", "mae", "step_time", "data_wait", "samples_per_s"} <= r.keys()
        assert 0.0 <= r["data_wait"] <= 1.0


# ------------------------------------------------------------------ data order
def test_each_epoch_is_a_permutation_and_resume_continues_the_sequence():
    s = ResumableBatchSampler(24, batch_size=8, grad_accum=2, world_size=1, rank=0, seed=3)
    epochs = []
    for e in range(2):
        s.set_position(e, 0)
        epochs.append([k for mb in s for k in mb])
    for e, keys in enumerate(epochs):
        assert sorted(k[2] for k in keys) == list(range(24)) and all(k[0] == e for k in keys)
    assert [k[2] for k in epochs[0]] != [k[2] for k in epochs[1]]
    s.set_position(0, 1)  # resume after one step: exactly the rest, nothing repeated or skipped
    assert [k for mb in s for k in mb] == epochs[0][8:]


def test_ranks_split_each_global_batch_independently_of_world_size():
    one = ResumableBatchSampler(32, 8, 1, 1, 0, seed=5)
    two = [ResumableBatchSampler(32, 8, 2, 2, r, seed=5) for r in range(2)]  # 2 ranks x 2 micro-batches of 2
    steps_one = [sorted(mb) for mb in one]
    per_rank = [list(s) for s in two]
    for step in range(4):
        merged = sorted(k for r in range(2) for mb in per_rank[r][2 * step:2 * step + 2] for k in mb)
        assert merged == steps_one[step]
    with pytest.raises(ValueError, match="divisible"):
        ResumableBatchSampler(32, 8, 3, 1, 0, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(4, 8, 1, 1, 0, seed=0)


def test_weighted_sampling_is_seeded_and_respects_zero_weights():
    w = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 0.0, 1.0, 1.0])
    a = ResumableBatchSampler(8, 4, 1, 1, 0, seed=1, weights=w)
    b = ResumableBatchSampler(8, 4, 1, 1, 0, seed=1, weights=w)
    keys = [k for mb in a for k in mb]
    assert keys == [k for mb in b for k in mb]
    assert not {k[2] for k in keys} & {0, 3, 5}


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone():
    ds = SeededDataset(ToyData(), seed=0)
    before = torch.get_rng_state()
    x1, _ = ds[(0, 5, 2)]
    assert torch.equal(torch.get_rng_state(), before)
    x2, _ = ds[(0, 5, 2)]
    x3, _ = ds[(1, 5, 2)]  # same item, another epoch: another augmentation
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


# ------------------------------------------------------------------ non-finite losses, EMA
def test_non_finite_step_is_skipped_and_counted(tmp_path):
    task = ToyTask(nan_steps={2})
    result = train(tmp_path, task, max_steps=4, checkpoint_every=0, log_every=4)
    assert result["nonfinite_total"] == 1 and result["step"] == 4
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


@pytest.mark.parametrize("task_type", [ToyTask, FusedToyTask])
@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_non_finite_gradient_behind_a_finite_loss_is_skipped_with_or_without_clipping(tmp_path, task_type,
                                                                                          grad_clip):
    task = task_type(inf_grad_steps={1})
    result = train(tmp_path, task, max_steps=3, checkpoint_every=0, log_every=3, grad_clip=grad_clip)
    assert result["nonfinite_total"] == 1 and result["step"] == 3
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_resuming_with_a_batch_size_whose_epoch_ends_at_the_saved_step_starts_the_next_epoch(tmp_path, caplog):
    """48 items: 6 steps of 8 per epoch; resumed at step 4 with batch 12 (4 steps per epoch): epoch 1 starts."""
    def run(batch_size, **kw):
        return Trainer(config(batch_size=batch_size, **kw), tmp_path, ToyTask(), ToyData(),
                       run_config={"model": {"width": 16}, "train": {"batch_size": batch_size}}, **kw_resume).fit()

    kw_resume = {}
    run(8, max_steps=4, checkpoint_every=4)
    kw_resume = {"resume": True}
    with caplog.at_level("WARNING"):
        result = run(12, max_steps=8)
    assert result["step"] == 8 and result["epoch"] == 2
    assert "train.batch_size changed from 8 to 12" in caplog.text and "epoch 1 starts" in caplog.text


@pytest.mark.parametrize("task_type", [ToyTask, FusedToyTask])
def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(tmp_path, task_type):
    task = task_type(nan_steps=set(range(5, 100)))
    with pytest.raises(RuntimeError, match=r"at step 8: 3 non-finite steps in a row.*step-0000004"):
        train(tmp_path, task, max_steps=20, max_nonfinite=3, checkpoint_every=4)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_resuming_across_a_layout_change_keeps_adams_moments_in_place(tmp_path, first, then):
    """train.compile may change on --resume (only the model section must match): Adam's moments, saved
    in the old parameters' layout, must take the new one, or fused AdamW pairs the wrong elements."""
    train(tmp_path / "straight", ChannelsLastTask(), max_steps=8, checkpoint_every=4, compile=then)
    train(tmp_path / "resumed", ChannelsLastTask(), max_steps=4, checkpoint_every=4, compile=first)
    train(tmp_path / "resumed", ChannelsLastTask(), resume=True, max_steps=8, checkpoint_every=4, compile=then)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for k in straight:   # NHWC and NCHW convs round differently: close, not equal
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5)


def test_fused_optimizers_skip_a_non_finite_step_on_the_device(tmp_path):
    """Fused AdamW (CUDA's, here on the CPU) skips the step through found_inf, with no host sync: the
    weights, Adam's step counts and the EMA after a skipped step 2 are those after step 1."""
    task = FusedToyTask(nan_steps={1})   # train_step's step is 0-based
    result = train(tmp_path / "skipped", task, max_steps=2, checkpoint_every=0, log_every=2, ema_decay=0.5)
    assert result["nonfinite_total"] == 1
    train(tmp_path / "one", FusedToyTask(), max_steps=1, checkpoint_every=0, log_every=1, ema_decay=0.5)
    skipped, one = (load_checkpoint(sorted((tmp_path / d / "checkpoints").iterdir())[-1]) for d in ("skipped", "one"))
    for group in ("model", "aux", "ema"):
        assert_same(skipped.tensors[group], one.tensors[group])
    steps = [s["step"] for s in task.opts["model"].state_dict()["state"].values()]
    assert steps and all(float(s) == 1.0 for s in steps)


def test_fused_adamw_clips_inside_its_step_as_clip_grad_norm_does(tmp_path):
    """The Trainer hands fused AdamW the clip's divisor (its grad_scale input) instead of scaling the gradients
    itself: the weights equal the unfused optimizer's after clip_grad_norm_, to rounding, and differ from an
    unclipped run's (clipping at 0.05 took effect)."""
    runs = (("fused", FusedToyTask(), 0.05), ("unfused", UnfusedToyTask(), 0.05), ("unclipped", FusedToyTask(), 0.0))
    for name, task, clip in runs:
        train(tmp_path / name, task, max_steps=6, checkpoint_every=6, log_every=1, grad_clip=clip)
    fused, unfused, unclipped = (final_weights(tmp_path / name) for name, _, _ in runs)
    for k in fused:
        torch.testing.assert_close(fused[k], unfused[k], rtol=1e-5, atol=1e-6)
        assert (fused[k] - unclipped[k]).abs().max() > 1e-3, k


def test_clip_divisor_is_clip_grad_norms_factor_inverted():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    norm, divisor = clip_divisor(g, max_norm=2.0)
    assert float(norm) == 5.0 and divisor.item() == pytest.approx((5.0 + 1e-6) / 2.0, rel=1e-7)
    assert clip_divisor(g, max_norm=10.0)[1].item() == 1.0          # under the max norm: left alone
    p = [t.clone().requires_grad_() for t in g]
    for t, q in zip(g, p):
        q.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(p, 2.0)
    for t, q in zip(g, p):
        torch.testing.assert_close(q.grad, t / divisor, rtol=1e-6, atol=0)


def test_ema_update_equals_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[k], 0.9 * old[k] + 0.1 * v, rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_weights_are_checkpointed_and_saved_as_the_model(tmp_path):
    task = ToyTask()
    train(tmp_path, task, max_steps=4, ema_decay=0.5)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "step-0000004")
    _, saved = load_model_dir(tmp_path)
    assert_same(saved, ckpt.tensors["ema"])
    assert not torch.equal(saved["0.weight"], ckpt.tensors["model"]["0.weight"])


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("grad_accum, num_workers", [(1, 0), (2, 0), (1, 2)])
def test_resume_after_a_crash_is_bit_identical(tmp_path, grad_accum, num_workers):
    kw = dict(grad_accum=grad_accum, num_workers=num_workers)
    train(tmp_path / "straight", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "crashed", ToyTask(crash_at=6), **kw)   # dies in step 7; last checkpoint at 4
    result = train(tmp_path / "crashed", resume=True, **kw)
    assert result["step"] == 12
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed"))
    a = load_checkpoint(tmp_path / "straight/checkpoints/step-0000012")
    b = load_checkpoint(tmp_path / "crashed/checkpoints/step-0000012")
    assert_same(a.tensors["aux"], b.tensors["aux"])
    assert a.state["epoch"] == b.state["epoch"] == 2  # 48 items / 8 per step = 6 steps per epoch


def test_resume_refuses_a_different_model_config_and_fresh_run_refuses_old_checkpoints(tmp_path):
    train(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match=r"model.width \(saved 16, given 32\)"):
        Trainer(config(), tmp_path, ToyTask(), ToyData(), resume=True, run_config={"model": {"width": 32}}).fit()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tmp_path)


def test_resume_without_checkpoint_starts_fresh(tmp_path, caplog):
    result = train(tmp_path, resume=True, max_steps=2)
    assert result["step"] == 2 and "has no checkpoint" in caplog.text


def test_resume_with_only_damaged_checkpoints_refuses_to_start_over(tmp_path):
    """Starting fresh would overwrite the run's model and prune its history: an error instead."""
    train(tmp_path, max_steps=8)                                     # checkpoints 4 and 8
    for manifest in (tmp_path / "checkpoints").glob("*/manifest.json"):
        manifest.write_text("{")
    with pytest.raises(CheckpointError, match="no checkpoint of .* passes verification .*step-0000008"):
        train(tmp_path, resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


def test_resume_past_a_damaged_newest_checkpoint_keeps_its_new_ones(tmp_path):
    """keep_checkpoints 1: the newest (damaged) checkpoint of the old timeline must not count against the
    checkpoints the resumed run writes; the metrics log drops the steps the run logs again."""
    train(tmp_path, max_steps=12, keep_checkpoints=3)                 # 4, 8, 12
    (tmp_path / "checkpoints/step-0000012/manifest.json").write_text("{")
    before = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert before == [2, 4, 6, 8, 10, 12]
    result = train(tmp_path, resume=True, max_steps=10, keep_checkpoints=1)   # from 8 to 10
    assert result["step"] == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000010", "step-0000012"]
    assert load_checkpoint(tmp_path / "checkpoints/step-0000010").step == 10
    after = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert after == [2, 4, 6, 8, 10]                                 # each step once


def test_resume_with_weights_of_another_shape_names_the_changed_key(tmp_path):
    """A section other than model shapes a module too (the tokenizer's loss.disc_layers): a clear error."""
    Trainer(config(max_steps=4), tmp_path, ToyTask(), ToyData(), run_config={"model": {}, "loss": {"w": 16}}).fit()
    with pytest.raises(ValueError, match=r"'model' weights do not fit .*loss.w \(saved 16, given 32\)"):
        Trainer(config(max_steps=8), tmp_path, ToyTask(width=32), ToyData(), resume=True,
                run_config={"model": {}, "loss": {"w": 32}}).fit()


# ------------------------------------------------------------------ real processes
def run_toy(out: str, resume: bool = False, sleep: float = 0.0, max_steps: int = 40, num_workers: int = 0) -> None:
    """Entry point for the subprocess tests."""
    import logging
    logging.basicConfig(level=logging.INFO)
    result = train(out, ToyTask(sleep=sleep), resume=resume, max_steps=max_steps, checkpoint_every=10,
                   keep_checkpoints=3, num_workers=num_workers)
    print("FINAL_STEP", result["step"], "EXIT", exit_status(result), flush=True)


def spawn(out, new_group: bool = False, **kw) -> subprocess.Popen:
    code = f"from tests.pipelines.test_trainer import run_toy; run_toy({str(out)!r}, **{kw!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_group)


@contextlib.contextmanager
def sigterm_once_exists(path: Path, timeout: float = 60.0):
    """SIGTERM this process once ``path`` (a checkpoint) exists, from a watcher thread: by then ``fit()`` is
    running with its handler installed, so an in-process training call inside the block stops on it."""
    def watch():
        end = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        watcher.join()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0):
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


def test_sigkill_then_resume_matches_straight_run(tmp_path):
    killed = spawn(tmp_path / "killed", sleep=0.05)
    wait_for(tmp_path / "killed/checkpoints/step-0000010", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = [p.name for p in (tmp_path / "killed/checkpoints").iterdir()]
    assert "step-0000040" not in done
    result = train(tmp_path / "killed", resume=True, max_steps=40, checkpoint_every=10, keep_checkpoints=3)
    assert result["step"] == 40
    train(tmp_path / "straight", max_steps=40, checkpoint_every=10)
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))
    assert_same(load_model_dir(tmp_path / "straight")[1], load_model_dir(tmp_path / "killed")[1])


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = spawn(tmp_path, sleep=0.05, max_steps=1000)
    wait_for(tmp_path / "checkpoints/step-0000010", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    step = int(out.split("FINAL_STEP")[1].split()[0])
    assert 10 <= step < 1000 and "received SIGTERM" in err
    ckpt = load_checkpoint(tmp_path / f"checkpoints/step-{step:07d}")
    assert ckpt.step == step and ckpt.state["step"] == step
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "run.yaml").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_process_group_with_data_workers_still_checkpoints(tmp_path, sig):
    """`timeout`, schedulers and Ctrl-C signal the whole group: the DataLoader workers too."""
    proc = spawn(tmp_path, new_group=True, sleep=0.05, max_steps=1000, num_workers=2)
    wait_for(tmp_path / "checkpoints/step-0000010", proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    step = int(out.split("FINAL_STEP")[1].split()[0])
    assert f"received {sig.name}" in err and "Traceback" not in err
    assert int(out.split("EXIT")[1].split()[0]) == 128 + sig          # the CLI's status: 143 / 130
    assert load_checkpoint(tmp_path / f"checkpoints/step-{step:07d}").step == step


def test_kept_kv_caches_are_not_checkpointed():
    """VAR's compiled sampler keeps its KV caches on the model between calls: they are scratch, so a checkpoint
    of a model that sampled saves the same extra buffers as one that never did (and resumes into a fresh one)."""
    from generator.transformer import Transformer
    from tests.generator.test_var import tiny_config
    backbone = Transformer(tiny_config())
    backbone.register_buffer("usage", torch.zeros(3), persistent=False)      # a real extra buffer stays
    before = set(extra_buffers(backbone))
    backbone.setup_caches(2, 16, torch.float32, "cpu")
    assert any("kv_cache" in n for n, _ in backbone.named_buffers())
    assert set(extra_buffers(backbone)) == before and "usage" in before


class TwoRanks:
    """A stand-in accelerator for StopVote: reduce(max) of this rank's flag and a scripted peer's."""

    def __init__(self, peer_requests, device="cpu"):
        self.peer = iter(peer_requests)
        self.device = torch.device(device)

    def reduce(self, flag, reduction):
        assert reduction == "max" and flag.device.type == self.device.type
        return torch.maximum(flag, torch.tensor(float(next(self.peer)), device=flag.device))


def test_stop_vote_reads_the_max_over_ranks_one_step_late():
    """Step k starts the vote on this step's requests and returns step k-1's: a peer's request at step 3
    stops this rank at step 4, its own at step 5 at step 6; nothing before a vote was started."""
    vote = StopVote(TwoRanks([0, 0, 1, 0, 0, 0]))
    mine = [False, False, False, False, True, False]
    assert [vote(r) for r in mine] == [False, False, False, True, False, True]
    # requests are codes (1: time limit, 128 + signum: a signal): the max says why a peer stopped
    vote = StopVote(TwoRanks([0, 128 + signal.SIGTERM, 0, 0, 0]))
    assert [vote(r) for r in [1, 1, 0, 0, 0]] == [0, 1, 143, 0, 0]
    assert signal_code(signal.SIGTERM) == 143 and signal_code(signal.SIGINT) == 130 > TIME_LIMIT
    assert code_signum(143) == signal.SIGTERM and code_signum(TIME_LIMIT) is None and code_signum(0) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stop_vote_on_cuda_reads_through_pinned_memory_and_an_event():
    """The CUDA branch: the result lands in pinned host memory behind queued GPU work (a long matmul
    chain before each vote), and the lagged answers are the CPU ones."""
    vote = StopVote(TwoRanks([0, 0, 1, 0, 0, 0], device="cuda"))
    assert vote.result.is_pinned() and vote.done is not None
    x = torch.randn(2048, 2048, device="cuda")
    answers = []
    for request in [False, False, False, False, True, False]:
        for _ in range(20):
            x = torch.tanh(x @ x)                     # the vote queues behind this work
        answers.append(vote(request))
    assert answers == [False, False, False, True, False, True]


def test_max_minutes_stops_with_a_checkpoint_like_a_signal(tmp_path):
    result = train(tmp_path, max_steps=1000, checkpoint_every=0, max_minutes=1e-9)   # over after the first step
    assert result["step"] == 1 and "time limit" in result["stopped_by"]
    assert result["signal"] is None and exit_status(result) == 0       # a planned end, not an interruption
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]
    with pytest.raises(ValueError, match="max_minutes must be >= 0"):
        config(max_minutes=-1)
