"""Small pieces of the training loop, each testable alone: TrainConfig, the LR schedule, AdamW
construction, the EMA copy of a model, RNG-state capture and the ranks' stop vote.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from generator.transformer import KVCache

MIXED_PRECISION = ("auto", "no", "bf16")   # bf16 needs no loss scaling; fp16 is not offered
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    batch_size: int = 32          # global batch: items per optimizer step, summed over processes and accumulation
    grad_accum: int = 1           # micro-batches per step; per-device micro batch = batch_size / (world * grad_accum)
    max_steps: int = 1000         # optimizer steps; the LR schedule is laid out over these
    lr: float = 3e-4              # peak learning rate, reached at the end of warmup
    warmup_steps: int = 100       # linear warmup avoids large early updates while Adam's moments are noisy
    min_lr_ratio: float = 0.1     # the cosine decays to lr * min_lr_ratio at max_steps, not to zero
    weight_decay: float = 0.05    # decoupled (AdamW); applied to matrices/kernels only, not norms or biases
    betas: tuple[float, float] = (0.9, 0.95)   # beta2 0.95: steadier for transformers/GANs than 0.999
    grad_clip: float = 1.0        # max global grad norm per optimizer; 0 disables clipping
    ema_decay: float = 0.0        # > 0 keeps an fp32 EMA of "model"; saved model dirs then hold the EMA weights
    mixed_precision: str = "auto"   # auto: bf16 on GPU, fp32 on CPU; or "no" / "bf16"
    compile: bool = False         # torch.compile "model" (the tokenizer: its conv stacks); GPU runs
    checkpoint_every: int = 500   # steps between checkpoints (0: only at the end); a SIGTERM also writes one
    keep_checkpoints: int = 3     # older checkpoints are deleted; keep > 1 so a corrupt newest one has a fallback
    log_every: int = 10           # steps between metrics.jsonl lines (averaged over the window)
    sample_every: int = 0         # steps between task.sample() grids; 0 disables
    seed: int = 0                 # seeds init, data order, augmentation and dropout: same seed, same run
    num_workers: int = 0          # DataLoader worker processes; results do not depend on it
    max_nonfinite: int = 10       # stop after this many non-finite steps in a row (each is skipped; fused
                                  # optimizers skip on the device and the count is read every log_every steps)
    max_minutes: float = 0.0      # wall-clock limit: stop with a checkpoint after this long (0 = none)
    distributed: str = "ddp"      # multi-process strategy under `accelerate launch`: ddp | fsdp (full shard)

    def __post_init__(self):
        positive = {"batch_size": self.batch_size, "lr": self.lr, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints, "max_nonfinite": self.max_nonfinite}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"train.{name} must be > 0, got {value}")
        non_negative = {"max_steps": self.max_steps, "warmup_steps": self.warmup_steps,
                        "weight_decay": self.weight_decay, "grad_clip": self.grad_clip,
                        "checkpoint_every": self.checkpoint_every, "sample_every": self.sample_every,
                        "seed": self.seed, "num_workers": self.num_workers, "max_minutes": self.max_minutes}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"train.{name} must be >= 0, got {value}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two values in [0, 1), got {self.betas}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision {self.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"train.distributed {self.distributed!r} is not one of {list(DISTRIBUTED)}")
        if self.distributed == "fsdp" and self.ema_decay > 0:
            raise ValueError("train.ema_decay > 0 is not supported with distributed: fsdp (use ddp)")


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of the base LR for the update taken at ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, then a cosine from 1 at
    ``warmup_steps`` down to ``min_lr_ratio`` at ``max_steps`` (and flat after).
    """
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    r = train.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(params, train: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW for a module (or named parameters): decay on >= 2-d weights only; fused on CUDA.

    Tasks build their optimizers with this (the Trainer has moved modules to the device first).
    ``lr`` defaults to ``train.lr``; the Trainer scales every group's initial lr by the schedule.
    """
    named = list(params.named_parameters()) if isinstance(params, nn.Module) else list(params)
    trainable = [p for _, p in named if p.requires_grad]
    if not trainable:
        raise ValueError("the optimizer got no trainable parameters")
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = all(p.is_cuda for p in trainable)
    return torch.optim.AdamW(groups, lr=train.lr if lr is None else lr, betas=tuple(train.betas),
                             fused=fused or None)


def clip_divisor(grads: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients' global L2 norm and what clipping to ``max_norm`` divides them by: max(1, (norm + 1e-6) /
    max_norm), the reciprocal of ``clip_grad_norm_``'s factor. A fused AdamW takes the divisor as its ``grad_scale``
    input and divides inside its own kernel, so the clip costs no pass of its own over the gradients (NOTES A65)."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm, torch.clamp((norm + 1e-6) / max_norm, min=1.0)


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself: accelerate's ``AcceleratedOptimizer`` wraps it as ``.optimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory layout.

    A checkpoint keeps the moments in the layout of the run that wrote it; a resumed run may lay its
    parameters out differently (``train.compile`` switched: the tokenizer's ``compile_modules`` makes
    its convs channels_last). Fused AdamW walks a parameter and its moments as flat arrays, so it
    would pair the wrong elements, silently."""
    for p, state in torch_optimizer(optimizer).state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class EMA:
    """An fp32 exponential moving average of a module: ``ema = decay * ema + (1 - decay) * param``.

    ``module`` is a frozen deep copy, usable as the model itself (sampling, save_model). Buffers
    (e.g. codebook statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """One EMA step; ``keep`` (0-dim, 1 or 0) scales it on the device, so a step the optimizer
        skipped there (non-finite) leaves the average unchanged without a host sync."""
        ema_params, params = [], []
        for (name, e), (_, p) in zip(self.module.named_parameters(), model.named_parameters()):
            ema_params.append(e)
            params.append(p.detach().to(e.dtype))
        if ema_params and keep is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        elif ema_params:   # ema += (1 - decay) * keep * (param - ema)
            step = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(step, (1.0 - self.decay) * keep.to(ema_params[0].dtype))
            torch._foreach_add_(ema_params, step)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict, strict=True)


TIME_LIMIT = 1          # StopVote's code for a run's time limit; a signal's is signal_code(signum)


def signal_code(signum: int) -> int:
    """The shell's code for a process a signal stopped, 128 + its number (143 SIGTERM, 130 Ctrl-C): the training
    commands' exit status after one, and ``StopVote``'s request for it (above ``TIME_LIMIT``)."""
    return 128 + signum


def code_signum(code: int) -> int | None:
    """The signal number in a ``signal_code``; None for ``TIME_LIMIT`` or 0."""
    return code - 128 if code > 128 else None


class StopVote:
    """The ranks of a multi-process run agree to stop at the same step without a host sync per step.

    Each step starts the all-reduce (max) of this rank's stop request and returns the result of the one
    started a step earlier. A request is a code: 0 none, ``TIME_LIMIT``, ``signal_code(signum)`` (so the max
    over ranks is the most pressing, and a rank that stops for a peer's signal knows which).
    On CUDA the result was copied to pinned host memory behind the earlier step's work and is waited for
    through an event: the host waits for step N-1 to finish, never for step N that it has just queued
    (``.item()`` on the device tensor would). Each code's tensor is made on the device at its first use,
    so a vote copies nothing from the host after that. All ranks read the same reduced value at the same
    step, so they stop together, one step after the request.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.flags: dict[int, torch.Tensor] = {}
        cuda = accelerator.device.type == "cuda"
        self.result = torch.zeros((), pin_memory=cuda)
        self.done = torch.cuda.Event() if cuda else None   # None: the reduce was synchronous (CPU)
        self.started = False

    def __call__(self, request: int) -> int:
        """Start this step's vote with ``request`` (a code, or a bool); the previous step's max (0: go on)."""
        code = 0
        if self.started:
            if self.done is not None:
                self.done.synchronize()
            code = int(self.result.item())
        request = int(request)
        if request not in self.flags:
            self.flags[request] = torch.tensor(float(request), device=self.accelerator.device)
        reduced = self.accelerator.reduce(self.flags[request], "max")
        self.result.copy_(reduced, non_blocking=self.done is not None)
        if self.done is not None:
            self.done.record()
        self.started = True
        return code


def rng_state() -> dict[str, torch.Tensor]:
    """Global torch RNG states as uint8 tensors (safetensors-able)."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8))


def extra_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (left out of state_dict, e.g. codebook usage tracking): an exact resume
    needs them, a saved model does not. KV caches are sampling scratch, not state (VAR's compiled sampler
    keeps them between calls): never saved."""
    persistent = set(module.state_dict())
    scratch = {f"{prefix}.{name}" for prefix, m in module.named_modules() if isinstance(m, KVCache)
               for name, _ in m.named_buffers(recurse=False)}
    return {name: b for name, b in module.named_buffers() if name not in persistent and name not in scratch}


@torch.no_grad()
def load_extra_buffers(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    buffers = dict(module.named_buffers())
    for name, value in tensors.items():
        if name not in buffers:
            raise ValueError(f"checkpoint has a buffer '{name}' that the module lacks")
        if buffers[name].shape != value.shape:  # a buffer that grows: replace it
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, value.to(buffers[name].device), persistent=False)
        else:
            buffers[name].copy_(value)


def exit_status(result: dict) -> int:
    """The training commands' exit status for ``Trainer.fit``'s result: 0 when the run reached max_steps or
    its time limit (``train.max_minutes``, a planned end); 128 + the signal's number when a signal stopped it
    (the shell's convention: 143 for SIGTERM, 130 for Ctrl-C), so ``train && evaluate`` does not go on with
    a model that was cut short. Its checkpoint is written either way: ``--resume`` continues it."""
    return signal_code(int(result["signal"])) if result.get("signal") else 0


def stopped_line(result: dict) -> str:
    """The Trainer's one line when a signal, the time limit or a peer stopped training: where, and how to go on."""
    return (f"stopped by {result['stopped_by']} at step {result['step']}; checkpoint: {result['checkpoint']} "
            f"(run the same command with --resume to continue)")
