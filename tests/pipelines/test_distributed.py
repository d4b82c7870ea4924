"""Multi-process training on the CPU (gloo): the shard-aware sampler, and real 2-process
`accelerate launch` runs of train-generator and train-tokenizer, loaded and resumed on 1 process,
and a run whose ranks stop together.

The three launches (each mostly interpreter start-up: ~20 s on 2 busy cores) start together in a
module fixture, so the launch tests (marked slow) cost about one launch; all else takes seconds.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from generator.base import Generator
from pipelines import cli, distributed
from pipelines.checkpoint import load_checkpoint
from pipelines.data import ImageFolderDataset, TokenDataset, tokenize_dataset
from pipelines.sampler import ResumableBatchSampler, SeededDataset, ShardedBatchSampler, build_batch_sampler
from tests.pipelines.test_train_generator import ColourData, make_tokenizer
from tokenizer.quantize import VectorQuantizer
from tokenizer.vqgan import VQGAN

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 300


def ranges(sizes):
    ends = np.cumsum(sizes).tolist()
    return list(zip([0] + ends[:-1], ends))


def epoch_keys(sampler, epoch, step=0):
    sampler.set_position(epoch, step)
    return [k for mb in sampler for k in mb]


# ------------------------------------------------------------------ the shard-aware sampler
@pytest.mark.parametrize("world, grad_accum", [(2, 2), (3, 1)])
def test_ranks_read_disjoint_whole_shards_and_see_each_item_once(world, grad_accum):
    sizes = [12, 12, 12, 12, 12, 7]                                       # the last shard is partial
    shard_of = {i: k for k, (a, b) in enumerate(ranges(sizes)) for i in range(a, b)}
    samplers = [ShardedBatchSampler(ranges(sizes), 12, grad_accum, world, r, seed=4) for r in range(world)]
    plans = []
    for epoch in range(3):
        owned = [set(s.rank_shards(epoch)) for s in samplers]
        assert sorted(k for o in owned for k in o) == list(range(len(sizes)))   # disjoint, all shards
        keys = [epoch_keys(s, epoch) for s in samplers]
        steps = samplers[0].steps_in_epoch(epoch)
        loads = [sum(sizes[k] for k in o) for o in owned]
        assert max(loads) - min(loads) <= max(sizes) and steps == min(loads) // (12 // world)
        seen = []
        for r, ks in enumerate(keys):
            assert len(ks) == steps * 12 // world                         # equal steps on every rank
            assert {shard_of[i] for _, _, i in ks} <= owned[r]            # a rank reads only its own shards
            assert all(e == epoch and pos == i for e, pos, i in ks)
            seen += [i for _, _, i in ks]
        assert len(seen) == len(set(seen)) == steps * 12                  # once each; the rest is dropped
        assert sum(sizes) - len(seen) == sum(n - steps * 12 // world for n in loads)
        plans.append(samplers[0].assignment(epoch))
    assert plans[0] != plans[1] or plans[1] != plans[2]                   # shard order reshuffled per epoch


def test_equal_shards_go_round_robin_and_resume_continues_exactly():
    s = ShardedBatchSampler(ranges([8] * 6), batch_size=8, grad_accum=2, world_size=2, rank=1, seed=0)
    g = torch.Generator().manual_seed(0 + 1)                              # epoch 1's shard permutation
    perm = torch.randperm(6, generator=g).tolist()
    assert s.assignment(1) == [perm[0::2], perm[1::2]]
    full = epoch_keys(s, 1)
    assert len(full) == 6 * 4 and len(s) == 6 * 2                        # 6 steps x 2 micro-batches of 2
    assert epoch_keys(s, 1, step=2) == full[2 * 4:]                      # resume after 2 steps of 4 items
    assert len(s) == (6 - 2) * 2                                          # micro-batches left in the epoch
    twin = ShardedBatchSampler(ranges([8] * 6), 8, 2, 2, 1, seed=0)
    assert epoch_keys(twin, 1) == full                                    # a fresh process: same order
    with pytest.raises(ValueError, match="outside epoch 1 of 6 steps"):
        s.set_position(1, 7)


def test_build_batch_sampler_picks_the_order_and_falls_back_loudly(caplog):
    class Sharded(torch.utils.data.Dataset):
        def __init__(self, sizes):
            self.shard_ranges = ranges(sizes)

        def __len__(self):
            return self.shard_ranges[-1][1]

    one = build_batch_sampler(Sharded([8] * 4), 8, 1, 1, 0, seed=3)      # 1 process: the global order as before
    assert isinstance(one, ResumableBatchSampler)
    assert epoch_keys(one, 0) == epoch_keys(ResumableBatchSampler(32, 8, 1, 1, 0, seed=3), 0)
    assert build_batch_sampler(Sharded([8] * 4), 8, 1, 2, 0, seed=3).kind == "sharded"
    assert build_batch_sampler(ColourData(32, 0), 8, 1, 2, 0, seed=3).kind == "global"   # not sharded
    with caplog.at_level(logging.WARNING):
        assert build_batch_sampler(Sharded([32]), 8, 1, 2, 0, seed=3).kind == "global"
        assert build_batch_sampler(Sharded([8] * 4), 8, 1, 2, 0, 3, weights=torch.ones(32)).kind == "global"
    assert "1 shards for 2 processes" in caplog.text and "weighted" in caplog.text
    with pytest.raises(ValueError, match="cannot give each of 2 processes 8 items"):
        ShardedBatchSampler(ranges([12, 12, 2]), 16, 1, 2, 0, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        build_batch_sampler(Sharded([8] * 4), 9, 1, 2, 0, seed=0)


def test_a_rank_loads_only_its_shards(art):
    data = TokenDataset(art["tokens"] / "train")
    s = ShardedBatchSampler(data.shard_ranges, 16, 1, 2, 0, seed=0)
    for epoch in range(2):
        data.retain_shards(s.rank_shards(epoch))                          # what the Trainer does per epoch
        for _, _, i in epoch_keys(s, epoch):
            data[i]
        assert data.loaded_shards == sorted(s.rank_shards(epoch))
        assert len(data.loaded_shards) == len(data.shard_ranges) // 2


def test_augmentations_do_not_depend_on_workers(tmp_path):
    """Image loading in DataLoader workers (train.num_workers) draws flips from per-item seeds."""
    write_images(tmp_path, per_class=4, split=False)
    folder = ImageFolderDataset(tmp_path, resolution=8, random_flip=True)
    sampler = ResumableBatchSampler(len(folder), 4, 1, 1, 0, seed=0)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(SeededDataset(folder, seed=0), batch_sampler=sampler, num_workers=workers)
        batches.append(torch.cat([images for images, _ in loader]))
    assert torch.equal(*batches)


# ------------------------------------------------------------------ world-size bookkeeping
def test_a_launch_that_accelerate_does_not_see_is_refused(monkeypatch, caplog):
    acc = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO, is_main_process=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2"):
        distributed.check_launch(acc, "ddp")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with caplog.at_level(logging.WARNING):
        distributed.check_launch(acc, "fsdp")
    assert "not sharded" in caplog.text


def test_resume_on_another_world_size_notes_what_is_exact():
    state = {"epoch": 2, "step_in_epoch": 1}
    one = ResumableBatchSampler(48, 16, 1, 1, 0, seed=0)
    assert distributed.continue_on_new_world(state, {"world_size": 1}, one, 1, 16) is None   # old checkpoints
    note = distributed.continue_on_new_world(state, {"world_size": 2, "data_order": "global"}, one, 1, 16)
    assert "continues exactly" in note and state == {"epoch": 2, "step_in_epoch": 1}
    two = ShardedBatchSampler(ranges([12] * 4), 16, 1, 2, 0, seed=0)
    note = distributed.continue_on_new_world(state, {"world_size": 1, "data_order": "global"}, two, 2, 16)
    assert "epoch 2 continues at step 1 of the new order" in note and "rank 1 start(s) a fresh random stream" in note
    state = {"epoch": 2, "step_in_epoch": 3}                              # past the end of the new epoch
    distributed.continue_on_new_world(state, {"world_size": 4, "data_order": "sharded"}, two, 2, 16)
    assert state == {"epoch": 3, "step_in_epoch": 0}


def test_each_rank_restores_its_own_random_stream():
    rows = torch.stack([torch.manual_seed(s).get_state() for s in (10, 11)])
    tensors = {"rng": {"torch_cpu": rows[0]}, "rng_ranks": {"torch_cpu": rows}}
    for rank in (0, 1):
        assert distributed.restore_rng(tensors, rank, seed=0, step=5)
        assert torch.equal(torch.get_rng_state(), rows[rank])
    assert not distributed.restore_rng(tensors, 2, seed=0, step=5)      # a rank the checkpoint did not have
    fresh = torch.get_rng_state()
    distributed.restore_rng(tensors, 2, seed=0, step=5)
    assert torch.equal(torch.get_rng_state(), fresh) and not torch.equal(fresh, rows[1])


def _codebook_rank(rank: int, port: int, out: Path) -> None:
    """One rank of the dead-code test: rank 0 only ever uses codes 0 and 1, rank 1 only 2 and 3."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, l2_normalize=False, usage_window=2)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.cat([torch.eye(4), -torch.eye(4)]))    # +-e_i: well apart
    ddp = torch.nn.parallel.DistributedDataParallel(vq.train())               # broadcasts rank 0's buffers
    z = torch.eye(4)[[0, 1] if rank == 0 else [2, 3]].repeat(8, 1).T.reshape(1, 4, 4, 4)
    restarted = []
    for _ in range(6):
        result = ddp(z)
        (result.z_q.sum() + result.loss).backward()
        restarted.append(int(result.stats["restarted"]))
    torch.save({"restarted": restarted, "weight": vq.codebook.weight.detach(), "ids": result.ids}, out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_dead_codes_count_every_ranks_usage(tmp_path):
    """Under DDP a code used only on rank 1 is alive: the usage is combined over ranks, not rank 0's. The ranks are
    spawned: forked, their backward fails once this pytest process has run a torch.compile'd function and a
    backward (autograd's threads cannot follow a fork), as earlier test files may."""
    torch.multiprocessing.start_processes(_codebook_rank, (free_ports(1)[0], tmp_path), nprocs=2,
                                          start_method="spawn")
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["restarted"] == [0, 0, 0, 4, 0, 0]          # codes 4-7 only, once the window has passed
        assert torch.equal(r["weight"][:4], torch.eye(4))    # the used codes are untouched on every rank
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert ranks[1]["ids"].unique().tolist() == [2, 3]


# ------------------------------------------------------------------ real 2-process runs
def write_images(root: Path, per_class: int, split: bool = True) -> Path:
    for part, n in ((("train", per_class), ("val", 1)) if split else (("", per_class),)):
        for c, cls in enumerate(("cat", "dog")):
            (root / part / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.random.default_rng(100 * c + i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / part / cls / f"{i}.png")
    return root


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


TOKENIZER_SETS = ["model.resolution=16", "data.resolution=16", "model.base_channels=8", "model.z_channels=8",
                  "model.codebook_size=16", "loss.disc_channels=8", "loss.disc_start=2", "train.batch_size=4",
                  "train.log_every=1"]                                    # the GAN (2nd optimizer) runs at step 3


def tokenizer_args(out: Path, images: Path) -> list[str]:
    sets = TOKENIZER_SETS + [f"data.dataset={images}"]
    return ["train-tokenizer", "--config", str(REPO / "configs/tokenizer/tiny.yaml"), "--output", str(out),
            "--max-steps", "3", *[a for s in sets for a in ("--set", s)]]


def generator_args(out: Path, tokens: Path) -> list[str]:
    return ["train-generator", "--config", str(REPO / "configs/generator/masked-tiny.yaml"), "--tokens", str(tokens),
            "--output", str(out), "--max-steps", "3", "--set", "model.num_classes=3"]


def launch(args: list[str], port: int, log: Path) -> subprocess.Popen:
    """`accelerate launch` of 2 CPU processes. accelerate's `--cpu --num_processes 2` starts ONE process
    (multi-CPU needs mpirun); `--multi_gpu` with ACCELERATE_USE_CPU=1 starts 2 on gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "pipelines.cli", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny vq tokenizer, a token cache of 48 items in 4 shards of 12 (+ a val cache), an image folder."""
    root = tmp_path_factory.mktemp("dist")
    tok = make_tokenizer(root / "tok")                                    # 16 px -> 8x8 of 64 codes
    tokenize_dataset(tok, ColourData(24, 1), root / "tokens" / "train", batch_size=8, shard_size=12)
    tokenize_dataset(tok, ColourData(6, 2), root / "tokens" / "val", batch_size=8, flips=False)
    return {"root": root, "tokens": root / "tokens", "images": write_images(root / "images", per_class=6)}


@pytest.fixture(scope="module")
def launched(art):
    if importlib.util.find_spec("accelerate.commands.launch") is None:
        pytest.skip("accelerate's launcher (accelerate.commands.launch) is not installed")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = art["root"]
    gen_port, tok_port, stop_port = free_ports(3)
    runs = {"gen": (root / "gen2", launch(generator_args(root / "gen2", art["tokens"]), gen_port, root / "gen.log"),
                    root / "gen.log"),
            "tok": (root / "tok2", launch(tokenizer_args(root / "tok2", art["images"]), tok_port, root / "tok.log"),
                    root / "tok.log"),
            "stop": (root / "stop2", launch([*generator_args(root / "stop2", art["tokens"]), "--max-steps", "50",
                                             "--set", "train.max_minutes=1.0e-9"], stop_port, root / "stop.log"),
                     root / "stop.log")}
    yield runs
    for _, proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(run) -> tuple[Path, str, str]:
    out, proc, log = run
    try:
        stdout, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"accelerate launch timed out:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return out, stdout, log.read_text()


def check_two_process_checkpoint(path: Path, order: str):
    ckpt = load_checkpoint(path)
    assert ckpt.state["world_size"] == 2 and ckpt.state["data_order"] == order
    rows = ckpt.tensors["rng_ranks"]["torch_cpu"]
    assert rows.shape[0] == 2 and torch.equal(rows[0], ckpt.tensors["rng"]["torch_cpu"])
    assert not torch.equal(rows[0], rows[1])                              # ranks draw different noise
    return ckpt


@pytest.mark.slow
def test_two_process_generator_run_loads_and_resumes_on_one_process(launched, art, capsys, caplog):
    out, stdout, log = finished(launched["gen"])
    assert stdout.count("trained a masked generator to step 3") == 1      # the main process reports
    assert "global batch 16 = 2 process(es) x 1 accumulation step(s) x 8 per device; sharded data order" in log
    ckpt = check_two_process_checkpoint(out / "checkpoints/step-0000003", "sharded")
    assert (ckpt.state["epoch"], ckpt.state["step_in_epoch"]) == (1, 0)   # 2 ranks x 24 items / 8 per step
    assert Generator.from_pretrained(out).config.kind == "masked"

    with caplog.at_level(logging.INFO):
        code = cli.main(["train-generator", "--tokens", str(art["tokens"]), "--output", str(out), "--resume",
                         "--max-steps", "5"])
    assert code == 0, capsys.readouterr().err
    assert "global batch 16 = 1 process(es) x 1 accumulation step(s) x 16 per device; global data order" in caplog.text
    assert "resuming a 2-process checkpoint (sharded data order) on 1 process(es)" in caplog.text
    assert "epoch 1 starts in the new order" in caplog.text
    resumed = load_checkpoint(out / "checkpoints/step-0000005")
    assert resumed.state["world_size"] == 1 and resumed.state["step"] == 5
    assert "rng_ranks" not in resumed.tensors
    assert "trained a masked generator to step 5" in capsys.readouterr().out
    Generator.from_pretrained(out)


@pytest.mark.slow
def test_two_processes_stop_together_one_step_after_the_request(launched):
    """Both ranks ask to stop after step 1 (train.max_minutes ~ 0). The vote each step starts is read one
    step later (StopVote: no host sync per step), so both stop at step 2 and write one final checkpoint;
    a rank that stopped alone would leave the other waiting in a collective (the launch would time out)."""
    out, _, log = finished(launched["stop"])
    assert "stopped by the time limit (train.max_minutes = 1e-09) at step 2" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert load_checkpoint(out / "checkpoints/step-0000002").state["world_size"] == 2


@pytest.mark.slow
def test_two_process_tokenizer_run_has_the_one_process_global_batches(launched, art, tmp_path, capsys):
    """Same global batch, same global order: step 1's loss (the same initial weights on the same 4
    images and flips) equals a 1-process run's, step 2's to float rounding; step 3 adds the GAN, whose
    adaptive weight each rank computes from its own micro-batch (not exact across world sizes)."""
    out, stdout, log = finished(launched["tok"])
    assert "global batch 4 = 2 process(es) x 1 accumulation step(s) x 2 per device; global data order" in log
    assert stdout.count("done at step 3") == 1
    check_two_process_checkpoint(out / "checkpoints/step-0000003", "global")
    assert VQGAN.from_pretrained(out).config.resolution == 16

    assert cli.main(tokenizer_args(tmp_path / "tok1", art["images"])) == 0, capsys.readouterr().err
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (out, tmp_path / "tok1")]
    losses = [[r["loss/model"] for r in rs] for rs in records]
    assert len(losses[0]) == len(losses[1]) == 3
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-4)
    assert records[0][2]["loss/disc"] > 0 and records[1][2]["loss/disc"] > 0
    w2, w1 = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "tok1/model.safetensors"))
    assert w2.keys() == w1.keys()
