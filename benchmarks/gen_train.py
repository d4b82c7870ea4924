"""GPU benchmark of generator training: tokens/s, MFU and the data-wait fraction.

    python3 -m benchmarks.gen_train [--part masked-L|ar-L|var-d16 ...] [--profile] [--var-alone-tokens N] [--smoke]
        [--rows-out F]

Each model is built from its real run config (configs/generator/<name>.yaml: model + train sections) and
trained the way pipelines/train_generator.py trains it: the GeneratorLoss wrapper (VAR: with the multi-scale
tokenizer set as codec, so the teacher-forcing inputs are built inside the step), torch.compile of that
wrapper (as the Trainer compiles "model"), bf16 autocast, fused AdamW (pipelines.train_utils.adamw) with
grad-norm clipping inside it (as the Trainer clips), flash / memory-efficient SDPA, and no host sync inside the
step. Batches: the eager step runs at the largest power of two (32 .. 512) that it fits; the compiled step at
that batch (the same-batch ratio) and at twice it, or 1.5x where twice runs out of memory: it keeps fewer
activations (on an H100, session 24: 36.0-37.5 GB where the eager step took 62.7-64.5 GB at the same batch),
so that is the batch that fills the GPU for it.
TESSERA_TRAIN_BATCH sets one batch for both (an eager step that does not fit it is an error row; the
compiled one still runs).

Data wait: the same compiled step fed through the real token-cache path (a synthetic cache written
by pipelines.data.tokenize_dataset to /tmp, TokenDataset, the Trainer's sampler + SeededDataset +
DataLoader, accelerate's send_to_device) against steps on a resident tensor.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch._functorch.config

from benchmarks import roofline
from benchmarks.common import (H100, RowSink, autocast, compiled, cudnn_benchmark, first_call_or_eager, floors,
                               free_memory, is_oom, job_args, peak_flops, peak_memory_gb, profile_ops, repo_root,
                               reset_peak_memory, search_max_batch, sync, time_fn)
from benchmarks.setups import TINY_GENERATOR, build_tokenizer, device
from pipelines.train_utils import clip_divisor

PARTS = ["masked-L", "ar-L", "var-d16"]
CONFIGS = {"masked-L": "configs/generator/masked-L.yaml", "ar-L": "configs/generator/ar-L.yaml",
           "var-d16": "configs/generator/var-d16.yaml"}
DATA_STEPS = 10
FOLD_CLIP = True     # fused AdamW divides by the clip's divisor in its kernel, as the Trainer does (NOTES A65)


def load_config(name: str, smoke: bool) -> dict:
    from generator.config import GeneratorConfig
    from pipelines.config import load_sections
    from pipelines.train_utils import TrainConfig
    over = []
    if smoke:
        over = [f"model.{k}={v}" for k, v in TINY_GENERATOR.items()]
        if name.startswith("var"):
            over += ["model.scales=[1,2,4]", "model.codec_dim=8"]
    return load_sections(repo_root() / CONFIGS[name], {"model": GeneratorConfig, "train": TrainConfig}, over)


class Step:
    """One optimizer step of the real training objective, with no host sync."""

    def __init__(self, name: str, smoke: bool, dev: torch.device):
        from generator.base import build_generator
        from pipelines.train_generator import GeneratorLoss
        from pipelines.train_utils import adamw
        cfg = load_config(name, smoke)
        self.config, self.train = cfg["model"], cfg["train"]
        torch.manual_seed(0)
        self.generator = build_generator(self.config).to(dev).train()
        self.tokenizer = None
        if self.config.kind == "var":        # the trainer sets the multiscale tokenizer as codec
            self.tokenizer = build_tokenizer("msvq", smoke, dev)
            self.generator.set_codec(self.tokenizer)
        self.wrapper = GeneratorLoss(self.generator)
        self.opt = adamw(self.wrapper, self.train)            # fused on CUDA
        self.params = [p for p in self.wrapper.parameters() if p.requires_grad]
        self.fwd = self.wrapper
        self.dev, self.smoke = dev, smoke

    def __call__(self, ids_BL: torch.Tensor, labels_B: torch.Tensor) -> None:
        # SDPA picks its backend as the Trainer's step does (cuDNN attention on an H100/H200 with torch 2.11;
        # until session 8 this step forced flash / memory-efficient, the Trainer never did: NOTES A25)
        with autocast(self.dev):
            out = self.fwd(ids_BL, labels_B)
        out.loss.backward()
        self.opt.grad_scale = None
        if self.train.grad_clip > 0 and FOLD_CLIP and self.opt.defaults.get("fused"):   # as the Trainer clips
            _, self.opt.grad_scale = clip_divisor([p.grad for p in self.params], self.train.grad_clip)
        elif self.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def batch(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.config.codebook_size, (n, self.config.num_tokens), generator=g)
        labels = torch.randint(0, self.config.num_classes, (n,), generator=g)
        return ids.to(self.dev), labels.to(self.dev)


def train_facts(name: str, step: Step) -> dict:
    """The fields every training row of ``name`` carries: config, size, dtype, optimizer."""
    c, cuda = step.config, step.dev.type == "cuda"
    return dict(bench="train", model=name, config=CONFIGS[name],
                params_M=round(sum(p.numel() for p in step.params) / 1e6, 1), seq_len=c.num_tokens, lr=step.train.lr,
                grad_clip=step.train.grad_clip, dtype="bf16 autocast" if cuda else "fp32 (cpu smoke)",
                sdpa="default choice" if cuda else "cpu default", optimizer="AdamW fused" if cuda else "AdamW",
                dropout=c.dropout)


def step_iters(smoke: bool) -> dict:
    """``time_fn``'s warm-up and timed calls of a training step (smoke runs: one each)."""
    return {"warmup": 1, "iters": 1} if smoke else {"warmup": 2, "iters": 8}


def time_step(step: Step, sink: RowSink, facts: dict, label: str, batch: int, iters: dict, **extra) -> dict:
    """The step at ``batch`` timed as one row (its floors, tokens/s, MFU and peak memory)."""
    c, pf = step.config, peak_flops()
    ids, labels = step.batch(batch)
    free_memory()
    reset_peak_memory()
    t = time_fn(lambda: step(ids, labels), **iters)
    model = roofline.training_step(c, sum(p.numel() for p in step.params), batch)
    return sink.add(name=f"{facts['model']} train {label}", **facts, batch=batch,
                    **floors(model["flops"], model["bytes"], H100 if step.smoke else None), **t,
                    tokens_per_s=batch * c.num_tokens / t["median_s"],
                    mfu=model["flops"] / t["median_s"] / pf if pf else None, peak_mem_gb=peak_memory_gb(), **extra)


def variant_sweep(name: str, args, sink: RowSink, variants: list[tuple[str, Callable[[Step], dict]]]) -> None:
    """Variants of the compiled step side by side in one process, at ``--batch``, in the order given and then the
    first again (drift); rows ``<name> train compiled <label>``. Each ``(label, apply)``: ``apply(step)`` sets
    ``step.fwd`` and whatever the variant changes, and returns the row's extra fields. ``--profile``: the first
    variant's two steps profiled too. Skips the eager step, the batch search, the codec inputs and the data
    wait (``train_model`` runs those), so three variants cost about one full job."""
    step = Step(name, args.smoke, device(args.smoke))
    facts, B = train_facts(name, step), 4 if args.smoke else args.batch
    iters = step_iters(args.smoke)
    torch._dynamo.reset()       # graphs of earlier compiles of the loss's forward count towards its recompile limit
    for i, (label, apply) in enumerate(variants + variants[:1]):
        extra = apply(step)
        label = f"compiled {label}" + (" again" if i == len(variants) else "")
        status = {"compile": "wrapper: default"}
        ids, labels = step.batch(B)
        if first_call_or_eager(lambda: step(ids, labels), None, status) is None:
            sink.add(name=f"{name} train {label}", **facts, batch=B, **status, **extra,
                     error="the compiled step failed")
            step.fwd = step.wrapper         # the next variant compiles afresh
            continue
        if args.profile and i == 0:
            sink.add(name=f"{name} train profile {label}", bench="profile", model=name, batch=B, **status, **extra,
                     **profile_ops(lambda: [step(ids, labels) for _ in range(2)], step.dev.type == "cuda", top=60))
        del ids, labels
        try:
            time_step(step, sink, facts, label, B, iters, **status, **extra)
        except Exception as e:  # noqa: BLE001
            sink.error(f"{name} train {label}", e, batch=B, **status)
        step.opt.zero_grad(set_to_none=True)
        free_memory()


def alone_variants(thresholds: list[int], smoke: bool) -> list[tuple[str, Callable[[Step], dict]]]:
    """VAR's teacher-forcing attention groupings (NOTES A53, A55), each a threshold of generator.var.ALONE_TOKENS.
    The step is compiled once: dynamo guards on the threshold, a global read while tracing, so a new one traces
    its own graph and the repeat reuses the first's."""
    import generator.var

    def variant(alone: int):
        def apply(step: Step) -> dict:
            if step.config.kind != "var":
                raise SystemExit(f"--var-alone-sweep is for the VAR part, not {step.config.kind}")
            if step.fwd is step.wrapper:
                step.fwd = compiled(step.wrapper, "default", smoke)
            generator.var.ALONE_TOKENS = alone
            return {"alone_tokens": alone}
        return f"[alone>={alone}]", apply
    return [variant(alone) for alone in thresholds]


# how a training step may compile (`--compile-sweep`): inductor options, and module switches (module, name): value
# set while it compiles and runs. Coordinate-descent tuning of each generated kernel's launch (block sizes, warps);
# autotuning the pointwise / reduction kernels over more configs; a pointwise result stored once it feeds kernels
# reading more than 2 buffers, not 4 (the fp32 residual stream: NOTES A43); adaLN's residual add + modulated norm
# as inductor's kernels instead of generator/fused_adaln.py's op (NOTES A61); qk-norm + RoPE likewise instead of
# generator/fused_qk_rope.py's (NOTES A63), or that op with its backward in torch ops (A66); grad clipping as its
# own pass over the gradients instead of inside fused AdamW (A65)
COMPILE_VARIANTS = {"default": ({}, {}), "cd": ({"coordinate_descent_tuning": True}, {}),
                    "pointwise": ({"max_autotune_pointwise": True}, {}), "reads2": ({"realize_reads_threshold": 2}, {}),
                    "adaln-torch": ({}, {("generator.fused_adaln", "ENABLED"): False}),
                    "qk-torch": ({}, {("generator.fused_qk_rope", "ENABLED"): False}),
                    "qk-bwd-torch": ({}, {("generator.fused_qk_rope", "BACKWARD_KERNEL"): False}),
                    "clip-pass": ({}, {("benchmarks.gen_train", "FOLD_CLIP"): False})}


def compile_variants(names: list[str], smoke: bool) -> list[tuple[str, Callable[[Step], dict]]]:
    """The step compiled afresh under each of COMPILE_VARIANTS' named variants (each sets its switches and puts the
    others' back to what they were), with AOT autograd's cache off."""
    import importlib
    if unknown := set(names) - set(COMPILE_VARIANTS):
        raise SystemExit(f"unknown compile variants {sorted(unknown)}; choose from {list(COMPILE_VARIANTS)}")
    switches = {key for _, sw in COMPILE_VARIANTS.values() for key in sw}
    initial = {(mod, attr): getattr(importlib.import_module(mod), attr) for mod, attr in switches}

    def variant(key: str):
        def apply(step: Step) -> dict:
            options, sw = COMPILE_VARIANTS[key]
            for (mod, attr), value in {**initial, **sw}.items():
                setattr(importlib.import_module(mod), attr, value)
            torch._dynamo.reset()
            # AOT autograd's cache keys a compiled forward + backward on the forward graph: a switch that changes only
            # the backward (qk-bwd-torch) would get the first variant's backward back from it (A66)
            torch._functorch.config.enable_autograd_cache = False
            step.fwd = compiled(step.wrapper, "default", smoke, options=options)
            return {"inductor_options": options, **({"switches": {f"{m}.{a}": v for (m, a), v in sw.items()}}
                                                    if sw else {})}
        return f"[{key}]", apply
    return [variant(key) for key in names]


def train_model(name: str, args, sink: RowSink) -> None:
    dev = device(args.smoke)
    step = Step(name, args.smoke, dev)
    override = os.environ.get("TESSERA_TRAIN_BATCH")
    # 1. the batch that fills the GPU for the eager step: the largest power of two that fits
    if override:
        B = int(override)
    elif args.smoke:
        B = 4
    else:
        # two steps a probe: one step of VAR-d16 at 128 fitted where the timed ones then ran out (b129851a3e93)
        res = search_max_batch(lambda n: [step(*step.batch(n)) for _ in range(2)], 32, 512, 6, bisect=False)
        step.opt.zero_grad(set_to_none=True)
        B = res["max_batch"]
        if B is None:
            sink.add(name=f"{name} train", batch=None, error=f"batch 32 does not fit: {res['attempts']}")
            return
    facts = train_facts(name, step)
    iters = step_iters(args.smoke)

    def timed(label: str, batch: int, **extra) -> dict:
        return time_step(step, sink, facts, label, batch, iters, **extra)

    try:
        timed("eager", B, compile="eager")
    except Exception as e:  # noqa: BLE001
        sink.error(f"{name} train eager", e, batch=B)
    # 2. compiled, as the Trainer compiles the "model" module (mode: default), at the eager step's batch (the
    # same-batch ratio), then at twice it or 1.5x (the module's docstring); a new batch recompiles (static shapes)
    status = {"compile": "wrapper: default"}
    step.fwd = compiled(step.wrapper, "default", args.smoke)
    ids, labels = step.batch(B)
    if first_call_or_eager(lambda: step(ids, labels), None, status) is None:
        step.fwd = step.wrapper
    del ids, labels
    fills = B           # the largest batch the compiled step ran at: the profile and the data wait use it
    try:
        timed("compiled", B, **status)
    except Exception as e:  # noqa: BLE001
        sink.error(f"{name} train compiled", e, batch=B, **status)
    larger_batches = [2 * B, 3 * B // 2] if not override and 2 * B <= 512 and step.fwd is not step.wrapper else []
    for larger in larger_batches:
        ran_out = False
        try:
            timed(f"compiled b{larger}", larger, **status,
                  note=f"the compiled step at {larger / B:g}x the batch its eager step fits ({B})")
            fills = larger
        except Exception as e:  # noqa: BLE001 - an OOM is an answer: try the next, smaller batch
            ran_out = is_oom(e)
            if not ran_out:
                sink.error(f"{name} train compiled b{larger}", e, batch=larger, **status)
        if fills != larger:     # out here, the exception and the failed step's tensors it held are gone
            step.opt.zero_grad(set_to_none=True)
            free_memory()
        if ran_out:
            sink.add(name=f"{name} train compiled b{larger}", **facts, batch=larger, **status,
                     note=f"out of memory at batch {larger} (compiled)")
        if fills == larger or not ran_out:
            break
    if args.profile:   # where the compiled step's GPU time goes (two steps)
        ids, labels = step.batch(fills)
        try:
            sink.add(name=f"{name} train profile", bench="profile", model=name, batch=fills, **status,
                     **profile_ops(lambda: [step(ids, labels) for _ in range(2)], dev.type == "cuda", top=25))
        except Exception as e:  # noqa: BLE001
            sink.error(f"{name} train profile", e, batch=fills, **status)
        del ids, labels
    # 3. VAR: the codec's share of a step (teacher-forcing inputs, built by the tokenizer each step): eager; eager
    # with cuDNN timing its conv algorithms (the Phi convs are float32: is cuDNN's default pick what takes the
    # time?); compiled as the compiled step traces it (its share of that step: the MFU's FLOPs leave it out)
    if step.tokenizer is not None:
        ids, _ = step.batch(fills)

        def codec_inputs():
            return step.generator.codec_inputs(ids, check_range=False)
        for label, fn, how, pick in (("", codec_inputs, "eager", False),
                                     (" [cudnn.benchmark]", codec_inputs, "eager", True),
                                     (" compiled", compiled(codec_inputs, "default", args.smoke), "default", False)):
            try:
                with cudnn_benchmark(pick):
                    t = time_fn(fn, **iters)
                sink.add(name=f"{name} codec inputs{label}", bench="train-part", model=name, batch=fills, compile=how,
                         **t, note="VQGAN.teacher_forcing_input per step, as the loss builds them (no range check, "
                                   "no sync)")
            except Exception as e:  # noqa: BLE001
                sink.error(f"{name} codec inputs{label}", e, batch=fills)
        del ids
    # 4. data wait: the real token-cache DataLoader path vs the resident tensor, at the compiled step's batch
    try:
        data_wait(name, step, fills, args.smoke, sink, {**facts, "batch": fills, **status})
    except Exception as e:  # noqa: BLE001
        sink.error(f"{name} data wait", e, batch=fills)


# ---- data wait ----------------------------------------------------------------------------------
class _FakeTokenizer:
    """What tokenize_dataset needs from a tokenizer, drawing random ids: the cache it writes is the
    real format (shards + labels + info.json) without a real tokenizer."""

    def __init__(self, config, dev: str = "cpu"):
        self.grid_size, self.codebook_size, self.scales = config.grid_size, config.codebook_size, config.scales
        self.config = SimpleNamespace(quantizer="multiscale" if config.scales else "vq")
        self.g = torch.Generator().manual_seed(0)

    def config_hash(self) -> str:
        return "benchmark-random"

    fingerprint = config_hash      # what tokenize_dataset records (was config_hash in the contract)

    def encode(self, images):
        return torch.randint(0, self.codebook_size, (len(images), self.grid_size, self.grid_size), generator=self.g)

    def encode_scales(self, images):
        return [torch.randint(0, self.codebook_size, (len(images), s, s), generator=self.g) for s in self.scales]


class _Labels(torch.utils.data.Dataset):
    def __init__(self, n: int, num_classes: int):
        self.labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(1))
        self.class_names = [f"class {i}" for i in range(num_classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(3, 1, 1), self.labels[i]


def write_synthetic_tokens(config, n_items: int, path, shard_size: int = 8192, batch_size: int = 256) -> None:
    """A token cache of random ids and labels for ``config`` (grid or scales, codebook, classes) in the
    real format (shards + labels + info.json), written by ``tokenize_dataset`` over an empty ``path``."""
    from pipelines.data import tokenize_dataset
    shutil.rmtree(path, ignore_errors=True)
    tokenize_dataset(_FakeTokenizer(config), _Labels(n_items, config.num_classes), path, batch_size=batch_size,
                     flips=False, shard_size=shard_size)


def token_loader(step: Step, B: int, n_items: int, path: Path):
    """The Trainer's data path over a synthetic token cache (pipelines/trainer.py Trainer._next_batch)."""
    from pipelines import sampler as samplers
    from pipelines.data import TokenDataset
    write_synthetic_tokens(step.config, n_items, path)
    data = TokenDataset(path)
    seed = step.train.seed
    if hasattr(samplers, "build_batch_sampler"):
        batches = samplers.build_batch_sampler(data, B, 1, 1, 0, seed)
    else:
        batches = samplers.ResumableBatchSampler(len(data), B, 1, 1, 0, seed)
    return torch.utils.data.DataLoader(samplers.SeededDataset(data, seed), batch_sampler=batches,
                                       num_workers=step.train.num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(seed))


def data_wait(name: str, step: Step, B: int, smoke: bool, sink: RowSink, facts: dict) -> None:
    from accelerate.utils import send_to_device
    n = 2 if smoke else DATA_STEPS
    path = Path(f"/tmp/tessera-bench-tokens-{name}")
    loader = token_loader(step, B, B * (n + 2), path)
    it = iter(loader)
    ids, labels = step.batch(B)
    step(*send_to_device(next(it), step.dev, non_blocking=True))     # worker start-up stays out of the timing
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step(ids, labels)
    sync()
    resident = time.perf_counter() - t0
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        batch = send_to_device(next(it), step.dev, non_blocking=True)
        wait += time.perf_counter() - t
        step(*batch)
    sync()
    loaded = time.perf_counter() - t0
    frac, blocked = max(0.0, 1 - resident / loaded), wait / loaded
    sink.add(name=f"{name} train data wait", **facts, median_s=loaded / n, resident_step_s=resident / n,
             loader_step_s=loaded / n, data_wait_fraction=frac, host_blocked_fraction=blocked,
             num_workers=step.train.num_workers,
             note=f"data wait {frac:.1%} (host blocked in next() {blocked:.1%}): {n} steps through TokenDataset + "
                  f"DataLoader (num_workers={step.train.num_workers}) vs a resident batch")
    del it, loader
    shutil.rmtree(path, ignore_errors=True)


def flags(p) -> None:
    p.add_argument("--profile", action="store_true", help="also profile two compiled steps (top operators by GPU time)")
    p.add_argument("--var-alone-tokens", type=int, help="VAR's teacher forcing: a scale of at least this many tokens "
                   "attends in its own SDPA call, the ones before it in one masked call (generator.var.ALONE_TOKENS; "
                   "more than the sequence: one masked call per layer, NOTES A53); rows named [alone>=N]")
    p.add_argument("--var-alone-sweep", type=lambda v: [int(x) for x in v.split(",")],
                   help="comma-separated thresholds: only the compiled VAR step at --batch, once per threshold "
                        "and the first again (variant_sweep)")
    p.add_argument("--compile-sweep", type=lambda v: v.split(","),
                   help=f"comma-separated compile variants ({', '.join(COMPILE_VARIANTS)}): only the compiled step at "
                        "--batch, compiled afresh under each and the first again (variant_sweep)")


def main() -> None:
    args = job_args(__doc__.splitlines()[0], PARTS, extra=flags)
    tag = ""
    if args.var_alone_tokens:
        import generator.var
        generator.var.ALONE_TOKENS, tag = args.var_alone_tokens, f" [alone>={args.var_alone_tokens}]"
    for part in args.part:
        sink = RowSink(args.rows_out, f"train {part}", args.smoke, tag)
        if args.var_alone_sweep:
            variant_sweep(part, args, sink, alone_variants(args.var_alone_sweep, args.smoke))
        elif args.compile_sweep:
            variant_sweep(part, args, sink, compile_variants(args.compile_sweep, args.smoke))
        else:
            train_model(part, args, sink)
        torch._dynamo.reset()   # compiled graphs hold the model: drop them before the next part
        free_memory()
        sync()


if __name__ == "__main__":
    main()
