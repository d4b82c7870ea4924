"""Tokenize a dataset once, then train any of the three generator families on the token cache.

``tessera tokenize`` writes TOKENS/train/ and TOKENS/val/ (two token caches, pipelines/data.py; the
train split also holds every image's mirror image unless --no-flip). ``tessera train-generator``
reads TOKENS/train (TOKENS may also be a single cache dir: then there is no validation), checks that
the cache fits the config's model (codebook size, grid, scales, classes) and, with --tokenizer, that
the tokenizer made it; trains with the shared Trainer; logs validation bits per token (AR/VAR exact
NLL, masked NELBO) on TOKENS/val to metrics.jsonl; and writes DIR as a generator dir
(config.json + model.safetensors + meta.json) that every pipeline loads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from generator.base import Generator, build_generator
from generator.config import GeneratorConfig
from pipelines.checkpoint import save_model_dir
from pipelines.config import load_run_config, to_dict
from pipelines.data import DataConfig, TokenDataset, build_image_dataset, tokenize_dataset
from pipelines.loading import (check_compatible, class_names_for, describe_tokens, load_tokenizer, pick_device,
                               write_meta)
from pipelines.trainer import Trainer
from pipelines.train_utils import TrainConfig, adamw, exit_status

logger = logging.getLogger(__name__)
SECTIONS = {"model": GeneratorConfig, "train": TrainConfig}


# ---- checks ------------------------------------------------------------------------------------
def token_dirs(tokens: str | Path) -> tuple[Path, Path | None]:
    """TOKENS -> (train cache, val cache or None). TOKENS is a `tessera tokenize` output or one cache dir."""
    tokens = Path(tokens)
    if not tokens.is_dir():
        raise FileNotFoundError(f"token directory not found: {tokens} (run `tessera tokenize` first)")
    if (tokens / "train").is_dir():
        val = tokens / "val"
        return tokens / "train", val if (val / "info.json").is_file() else None
    return tokens, None


def check_tokens(data: TokenDataset, config: GeneratorConfig) -> None:
    """ValueError unless the token cache fits the generator config; the message says what to set."""
    info = data.info
    if config.kind == "var" and not info.scales:
        raise ValueError(f"a var generator needs tokens from a multiscale tokenizer; {data.path} holds a "
                         f"single-scale grid ({describe_tokens(info.codebook_size, info.grid_size)})")
    if config.kind != "var" and info.scales:
        raise ValueError(f"a {config.kind} generator needs tokens from a single-scale (vq) tokenizer; {data.path} "
                         f"holds a multiscale pyramid ({describe_tokens(info.codebook_size, info.grid_size, info.scales)})")
    fixes = {"codebook_size": info.codebook_size, "grid_size": info.grid_size}
    if config.kind == "var":
        fixes["scales"] = list(info.scales)
    if info.class_names:
        fixes["num_classes"] = len(info.class_names)
    fixes = {k: v for k, v in fixes.items() if getattr(config, k) != (tuple(v) if isinstance(v, list) else v)}
    if fixes:
        raise ValueError(
            f"token cache {data.path} (tokenizer {info.tokenizer_hash}: "
            f"{describe_tokens(info.codebook_size, info.grid_size, info.scales)}, {len(info.class_names)} classes) "
            f"does not fit the model config ({describe_tokens(config.codebook_size, config.grid_size, config.scales)}, "
            f"{config.num_classes} classes): set " + " ".join(
                f"--set model.{k}={json.dumps(v).replace(' ', '')}" for k, v in fixes.items()))
    if len(data) and int(data.labels.max()) >= config.num_classes:
        raise ValueError(f"token cache {data.path} has label {int(data.labels.max())} but the model has "
                         f"{config.num_classes} classes")


# ---- the training task -------------------------------------------------------------------------
class GeneratorLoss(nn.Module):
    """The generator's training loss as ``forward``, so DDP/FSDP/compile wrappers see the whole step.
    VAR: the tokenizer set with ``set_codec`` builds the teacher-forcing inputs inside ``loss``."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, ids_BL: torch.Tensor, labels_B: torch.Tensor):
        return self.generator.loss(ids_BL, labels_B)


@torch.no_grad()
def val_bits_per_token(generator: Generator, val: TokenDataset, max_items: int = 512, batch_size: int = 64,
                       seed: int = 0) -> float:
    """Mean bits per token over the first ``max_items`` val items (masked: NELBO, seeded MC estimate)."""
    was_training, device = generator.training, generator.head.weight.device
    generator.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    total, count, n = 0.0, 0, min(len(val), max_items)
    try:
        for i in range(0, n, batch_size):
            items = [val[j] for j in range(i, min(i + batch_size, n))]
            ids = torch.stack([x[0] for x in items]).to(device)
            labels = torch.stack([x[1] for x in items]).to(device)
            bits = generator.nll_bits_per_token(ids, labels, generator=g)
            total, count = total + float(bits.float().sum()), count + len(items)
    finally:
        generator.train(was_training)
    return total / max(count, 1)


def last_validation_step(log: Path) -> int:
    """The last step metrics.jsonl holds a validation line for (-1: none)."""
    if not log.is_file():
        return -1
    steps = [-1]
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            if "val/bits_per_token" in record:
                steps.append(int(record["step"]))
    return max(steps)


class GeneratorTask:
    """TrainTask for every generator family (see pipelines/trainer.py)."""
    throughput_unit = "tokens"

    def __init__(self, generator: Generator, class_names: list[str], tokenizer_hash: str, tokens_info: dict,
                 output_dir: Path, val: TokenDataset | None = None, eval_every: int = 0, val_items: int = 512,
                 tokenizer=None, is_main=lambda: True):
        self.generator, self.wrapper = generator, GeneratorLoss(generator)
        self.class_names, self.tokenizer_hash, self.tokens_info = class_names, tokenizer_hash, tokens_info
        self.output_dir, self.val, self.eval_every, self.val_items = output_dir, val, eval_every, val_items
        self.tokenizer, self.is_main = tokenizer, is_main
        self.units_per_item = generator.config.num_tokens
        self.model, self.metrics, self._evaluated = self.wrapper, {}, None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.wrapper}

    def optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": adamw(self.wrapper, train)}      # decay on >= 2-D weights only; fused on CUDA

    def bind_modules(self, prepared: dict[str, nn.Module]) -> None:
        self.model = prepared["model"]

    def train_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        if self._evaluated is None:     # a resumed run's log may hold this step's validation already
            self._evaluated = last_validation_step(self.output_dir / "metrics.jsonl")
        if self.eval_every and step and step % self.eval_every == 0 and step != self._evaluated:
            self._evaluated = step                       # once per step, not per gradient-accumulation micro-batch
            self.log_validation(step)
        ids_BL, labels_B = batch
        out = self.model(ids_BL, labels_B)
        self.metrics = {f"train/{k}": v for k, v in out.metrics.items() if k != "loss"}
        return {"model": out.loss}

    def log_validation(self, step: int, generator: Generator | None = None) -> float | None:
        """Append {"step", "val/bits_per_token"} to metrics.jsonl (main process; no collectives)."""
        if self.val is None or not self.is_main():
            return None
        bits = val_bits_per_token(generator or self.generator, self.val, self.val_items)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "val/bits_per_token": bits, "val/items": min(len(self.val),
                                                                                         self.val_items)}) + "\n")
        logger.info("step %d: validation %.4f bits per token", step, bits)
        return bits

    def save_model(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        generator = modules["model"].generator
        save_model_dir(out_dir, to_dict(generator.config), generator.state_dict())
        write_meta(out_dir, self.tokenizer_hash, self.class_names, self.tokens_info)

    def sample(self, step: int, out_dir: Path) -> None:
        if self.tokenizer is None:
            logger.warning("no --tokenizer given: skipping the sample grid at step %d", step)
            return
        from pipelines.generate import ClassToImagePipeline, class_grid, family_options
        was_training = self.generator.training
        pipe = ClassToImagePipeline(self.tokenizer, self.generator, {"class_names": self.class_names,
                                                                     "tokenizer_hash": self.tokenizer_hash},
                                    device=self.generator.head.weight.device)
        try:
            classes = list(range(min(len(pipe.class_names), 10)))
            options = {"compile": False} if "compile" in family_options(self.generator) else {}   # AR: no recompile
            images = pipe([c for c in classes for _ in range(4)], num_steps=16, cfg_scale=2.0, seed=0, **options)
            class_grid(images, [pipe.class_names[c] for c in classes], 4).save(out_dir / f"step-{step:07d}.png")
        finally:
            self.generator.train(was_training)


# ---- commands ----------------------------------------------------------------------------------
def run_tokenize(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer, pick_device(args.device))
    resolution = args.resolution or tokenizer.config.resolution
    if resolution != tokenizer.config.resolution:
        raise ValueError(f"--resolution {resolution} differs from the tokenizer's {tokenizer.config.resolution} px "
                         f"({args.tokenizer}): its token grid would not be {tokenizer.grid_size}x{tokenizer.grid_size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    config = DataConfig(dataset=args.data, resolution=resolution, hflip=False)   # flips are tokenized explicitly
    splits = [args.split] if args.split else ["train", "val"]
    datasets = {}
    for split in splits:          # build (cheap) both before tokenizing either, so a missing val split fails fast
        try:
            datasets[split] = build_image_dataset(config, split)
        except ValueError as e:
            hint = " (use --split train to tokenize only the train split)" if split == "val" and not args.split else ""
            raise ValueError(f"{e}{hint}") from None
    for split, dataset in datasets.items():
        out = Path(args.output) / split
        info = tokenize_dataset(tokenizer, dataset, out, batch_size=args.batch_size,
                                flips=split == "train" and not args.no_flip, no_flip_classes=args.no_flip_class or ())
        print(f"{split}: {info.num_items} token sequences of {info.seq_len} tokens "
              f"({len(info.class_names)} classes) -> {out}")
    print(f"tokenized with tokenizer {tokenizer.fingerprint()} in {time.perf_counter() - t0:.1f} s")
    return 0


def run_train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    sections = load_run_config(args, SECTIONS)
    model_config, train_config = sections["model"], sections["train"]
    train_dir, val_dir = token_dirs(args.tokens)
    data = TokenDataset(train_dir)
    val = TokenDataset(val_dir) if val_dir is not None else None
    check_tokens(data, model_config)
    if val is not None and val.info.tokenizer_hash != data.info.tokenizer_hash:
        raise ValueError(f"{val_dir} was made by tokenizer {val.info.tokenizer_hash}, {train_dir} by "
                         f"{data.info.tokenizer_hash}: tokenize both splits with one tokenizer")
    if args.eval_every is not None and args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.val_items < 1:
        raise ValueError(f"--val-items must be >= 1, got {args.val_items}")
    if model_config.kind == "var" and args.tokenizer is None:
        raise ValueError("a var generator trains on the tokenizer's scale features: give --tokenizer DIR "
                         "(the multiscale tokenizer that made the tokens)")
    torch.manual_seed(train_config.seed)                        # the generator's init, as the Trainer seeds data
    generator = build_generator(model_config)
    meta = {"tokenizer_hash": data.info.tokenizer_hash, "class_names": data.info.class_names}
    info = data.info
    tokens_info = {"path": str(train_dir), "codebook_size": info.codebook_size, "grid_size": info.grid_size,
                   "scales": list(info.scales), "num_train": len(data), "num_val": len(val) if val else 0}
    task = GeneratorTask(generator, class_names_for(generator, meta), info.tokenizer_hash, tokens_info,
                         Path(args.output), val,
                         train_config.checkpoint_every if args.eval_every is None else args.eval_every,
                         args.val_items)
    run_config = {"model": to_dict(model_config), "train": to_dict(train_config)}
    trainer = Trainer(train_config, args.output, task, data, resume=args.resume, run_config=run_config)
    task.is_main = lambda: trainer.accelerator.is_main_process
    tokenizer = None
    if args.tokenizer is not None:       # frozen (eval, no grads), on this process's training device
        tokenizer = task.tokenizer = load_tokenizer(args.tokenizer, trainer.accelerator.device)
        data.check_tokenizer(tokenizer)
        check_compatible(tokenizer, generator, meta, tokenizer_dir=args.tokenizer)   # VAR: scales, codec_dim
    if model_config.kind == "var":
        generator.set_codec(tokenizer)
    logger.info("%s generator: %.2fM parameters, %d tokens per image, %d train / %d val items",
                model_config.kind, generator.num_params() / 1e6, model_config.num_tokens, len(data),
                len(val) if val else 0)
    result = trainer.fit()
    if result["signal"]:        # the checkpoint is written (the Trainer said where); no validation in a grace period
        return exit_status(result)
    bits = None
    if trainer.accelerator.is_main_process:     # the saved model (EMA weights when EMA is on), after the last step
        from generator.base import load_generator
        saved = load_generator(args.output, trainer.accelerator.device)
        if model_config.kind == "var":
            saved.set_codec(tokenizer)
        bits = task.log_validation(result["step"], saved)
        print(f"trained a {model_config.kind} generator to step {result['step']} in {time.perf_counter() - t0:.1f} s"
              + (f"; validation {bits:.4f} bits per token" if bits is not None else "")
              + f"; wrote {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="encode a dataset into a token cache (TOKENS/train, TOKENS/val)",
                       description="Encode every image (and, for train, its mirror image) once with a tokenizer.")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="emoji|PATH", help="'emoji' or an ImageFolder-style dir")
    p.add_argument("--output", required=True, metavar="TOKENS", help="writes TOKENS/train and TOKENS/val")
    p.add_argument("--split", choices=["train", "val"], help="only this split (default: both)")
    p.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="do not add mirrored train images (mirroring applies to "
                                                          "every class but --no-flip-class)")
    p.add_argument("--no-flip-class", nargs="+", metavar="NAME", help="classes with no mirrored copies, e.g. "
                                                                      "Flags Symbols (flags, text and arrows)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run_tokenize)

    p = sub.add_parser("train-generator", help="train a masked / ar / var generator on a token cache",
                       description="Train the generator family named by the config's model.kind on a token cache.")
    p.add_argument("--config", metavar="YAML", help="configs/generator/X.yaml (sections: model, train)")
    p.add_argument("--tokens", required=True, metavar="TOKENS", help="`tessera tokenize` output (or one cache dir)")
    p.add_argument("--output", required=True, metavar="DIR", help="run dir; becomes the generator dir")
    p.add_argument("--tokenizer", metavar="DIR", help="checks the cache, enables sample grids; required for var")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: checkpoint_every)")
    p.add_argument("--val-items", type=int, default=512, help="val items per validation")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=run_train)
