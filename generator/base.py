"""What the three generator families share: class conditioning, backbone, head, checks, save/load.

A family subclasses ``Generator`` and differs only in its inputs, positions, attention mask and
sampler (``loss``, ``nll_bits_per_token``, ``sample``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Hashable, NamedTuple, TypeVar

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from generator.config import GeneratorConfig
from generator.transformer import Transformer, flops_per_token, init_weights

FAMILIES = {"masked": "generator.masked:MaskedGenerator",
            "ar": "generator.autoregressive:ARGenerator",
            "var": "generator.var:VARGenerator"}


def eval_mode(method: Callable) -> Callable:
    """Run a sampling / likelihood method with the module in eval mode (no dropout, no class dropout:
    the same seed gives the same result), then restore the module's mode."""
    @functools.wraps(method)
    def in_eval(self, *args, **kwargs):
        if not self.training:
            return method(self, *args, **kwargs)
        self.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.train()
    return in_eval


class CompiledOrEager:
    """``torch.compile(target, **options)`` that falls back to ``eager`` for good, with a warning on ``log``,
    when compiling fails: at build, at its first call (where most compile errors surface) or later (e.g. a
    CUDA graph capture). A failed call is redone eagerly on the same inputs, so nothing is lost. The
    samplers keep one per module (keyed on the module: a deepcopy such as an EMA builds its own)."""

    def __init__(self, target, eager, what: str, log: logging.Logger, fallback: str = "running it eagerly",
                 **options):
        self.eager, self.what, self.log, self.fallback = eager, what, log, fallback
        try:
            self.fn = torch.compile(target, **options)
        except Exception as e:     # noqa: BLE001 - any compile failure -> eager
            self._fall_back(e)

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def _fall_back(self, e: Exception) -> None:
        self.log.warning("torch.compile of the %s failed (%s: %s); %s", self.what, type(e).__name__, e, self.fallback)
        self.fn = self.eager

    def __call__(self, *args, **kw):
        if not self.compiled:
            return self.eager(*args, **kw)
        try:
            return self.fn(*args, **kw)
        except Exception as e:     # noqa: BLE001 - e.g. an op this torch version cannot compile or capture
            self._fall_back(e)
            return self.eager(*args, **kw)


T = TypeVar("T")


class LossOutput(NamedTuple):
    loss: torch.Tensor                  # scalar to backpropagate
    metrics: dict[str, torch.Tensor]    # detached scalars for logging


class Generator(nn.Module):
    kind = ""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        if self.kind and config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs kind '{self.kind}', the config says '{config.kind}'")
        self.config = config
        self.class_emb = nn.Embedding(config.num_classes + 1, config.dim)   # last row: null class
        self.backbone = Transformer(config)
        self.head = nn.Linear(config.dim, config.codebook_size)
        self._compiled = None            # what compiled_once built (the family's compiled sampling functions)
        self._compiled_owner = None      # (id(self), device type) it was built for

    def compiled_once(self, build: Callable[[], T], variant: Hashable = None) -> T:
        """The family's compiled sampling functions: ``build()`` (``CompiledOrEager`` wrappers) on first
        use, then kept on the module. Rebuilt for a deepcopy (an EMA: another id, so it never replays
        graphs captured for the original), after a move to another device type (compile options
        depend on it) and for another ``variant`` (a module switch the build reads). Each family calls it
        from one place."""
        owner = (id(self), self.head.weight.device.type, variant)
        if self._compiled_owner != owner:
            self._compiled, self._compiled_owner = build(), owner
        return self._compiled

    def _init_weights(self) -> None:
        init_weights(self, self.config.depth)
        nn.init.zeros_(self.head.weight)   # start from uniform predictions: loss starts at log V

    # ---- checks a user can trip --------------------------------------------------------------
    def class_ids(self, classes, batch: int | None = None, device=None) -> torch.Tensor:
        """Class labels (B,) -> LongTensor (B,) on ``device``; None -> null class (unconditional).
        ``batch``: the batch the labels are for (None: any), e.g. the token grids they label."""
        device = device or self.head.weight.device
        if classes is None:
            if batch is None:
                raise ValueError("give classes or a batch size")
            return torch.full((batch,), self.config.null_class, dtype=torch.long, device=device)
        classes = torch.as_tensor(classes)      # checked where it is: lists and CPU tensors need no device sync
        if classes.numel() == 0:
            raise ValueError("no classes given: batch size would be 0")
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise ValueError(f"class ids must be integers, got dtype {classes.dtype}")
        if classes.dim() > 1:
            raise ValueError(f"class ids must be a list or a 1-D tensor, got shape {tuple(classes.shape)}")
        classes = classes.long().reshape(-1)
        self.check_label_count(classes, batch)
        out_of_range = (classes < 0) | (classes > self.config.num_classes)
        if out_of_range.any():         # on a GPU tensor, one device-to-host read (session 13's trace: ~1.3 ms)
            raise ValueError(f"class id {int(classes[out_of_range][0])} is out of range: the model has "
                             f"{self.config.num_classes} classes (0..{self.config.num_classes - 1}; "
                             f"{self.config.null_class} = unconditional)")
        return classes.to(device)

    @staticmethod
    def check_label_count(labels_B: torch.Tensor, batch: int | None) -> None:
        """One label per token grid (a shape check: no host sync)."""
        if batch is not None and (labels_B.dim() != 1 or labels_B.shape[0] != batch):
            raise ValueError(f"got {labels_B.numel()} class labels for a batch of {batch}")

    def token_batch(self, ids: torch.Tensor) -> torch.Tensor:
        """A training batch's ids, (B, N) or (B, h, w) -> (B, N) long: shape and dtype checked, values not
        (no host sync; the token cache checked them)."""
        N = self.config.num_tokens
        if ids.dim() == 3:
            ids = ids.reshape(ids.shape[0], -1)
        if ids.dim() != 2 or ids.shape[1] != N:
            raise ValueError(f"expected {N} tokens per image, as ids of shape (B, {N}), got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        return ids.long()

    def checked_token_batch(self, ids) -> torch.Tensor:
        """``token_batch`` of any array of ids, values checked too (one host sync): for likelihoods and logits
        of user-given ids, on the model's device."""
        return self.check_ids(self.token_batch(torch.as_tensor(ids))).to(self.head.weight.device)

    def check_ids(self, ids: torch.Tensor, length: int | None = None) -> torch.Tensor:
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.long()
        if length is not None and ids.shape[-1] != length:
            raise ValueError(f"expected {length} tokens per image, got {ids.shape[-1]}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.config.codebook_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    @staticmethod
    def check_sampling_args(num_steps: int, temperature: float, top_k: int, top_p: float, cfg_scale: float) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= temperature < math.inf:        # also refuses nan, which would pass a `< 0` test
            raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= cfg_scale < math.inf:
            raise ValueError(f"cfg_scale must be >= 0 and finite (1 = no guidance), got {cfg_scale}")

    def autocast_weights(self, dtype: torch.dtype = torch.bfloat16) -> "Generator":
        """Store every ``nn.Linear``'s weight and bias in ``dtype``, what autocast(``dtype``) casts them to
        on every call: under that autocast the outputs are bit-identical and no per-forward cast runs
        (reading 4 and writing 2 bytes per weight each pass: ~0.25 ms of every AR-B token step at batch
        64 on an H100). Embeddings and norm gains stay float32, as autocast keeps them. For inference:
        the model then runs only under autocast (the pipelines do this for the models they load on a GPU).
        The module's compiled sampling functions are dropped (rebuilt on next use); still, call it before
        the first compiled sampling: a step compiled for the float32 weights must not be replayed after
        they are freed (it faulted so on an H100 with torch 2.11 until dynamo's caches were reset)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        self._compiled = self._compiled_owner = None     # built for the old weights: compiled_once rebuilds
        return self

    def compute_dtype(self) -> torch.dtype:
        """The dtype activations have here: the autocast dtype when autocast is on for the weights'
        device (so KV caches are stored at 2 bytes, not converted every step), else the weights' dtype."""
        device_type = self.head.weight.device.type
        if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
            return torch.get_autocast_dtype("cuda")
        return self.head.weight.dtype

    def drop_classes(self, labels_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time class dropout: each label becomes the null class with prob class_dropout."""
        if not self.training or self.config.class_dropout == 0:
            return labels_B
        drop = torch.rand(labels_B.shape, device=labels_B.device, generator=generator) < self.config.class_dropout
        return torch.where(drop, torch.full_like(labels_B, self.config.null_class), labels_B)

    def grid_positions(self) -> torch.Tensor:
        """(h*w, 2) float (row, col) of each token in raster order."""
        g = self.config.grid_size
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float()

    # ---- sizes ------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
        return n

    def flops_per_token(self, training: bool = True) -> float:
        return flops_per_token(self.config, self.config.num_tokens, training)

    # ---- save / load ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors (weights only, no pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "kind": self.config.kind})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None) -> "Generator":
        """Rebuild from a directory's config.json and load its weights strictly."""
        config = read_config(directory)
        model_cls = family_class(config.kind)
        if cls is not Generator and not issubclass(model_cls, cls):
            raise ValueError(f"{directory} holds a '{config.kind}' generator, not a {cls.__name__}")
        model = model_cls(config)
        weights = Path(directory) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"generator directory {directory} has no model.safetensors")
        try:
            state = load_file(str(weights))
        except SafetensorError as e:
            raise ValueError(f"{weights} is not a valid safetensors file: {e}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:   # torch lists every mismatch on its own line: name the first, count the rest
            problems = [line.strip() for line in str(e).splitlines()[1:]] or [str(e)]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"{weights} does not match the model described by its config.json: "
                             f"{problems[0][:300]}{more}") from None
        return model.to(device) if device is not None else model


def read_config(directory: str | Path) -> GeneratorConfig:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"generator directory not found: {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"generator directory {directory} has no config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(fields))}")
    return GeneratorConfig(**data)


def family_class(kind: str) -> type[Generator]:
    if kind not in FAMILIES:
        raise ValueError(f"unknown generator kind '{kind}'; valid kinds: {', '.join(FAMILIES)}")
    module, name = FAMILIES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_generator(config: GeneratorConfig) -> Generator:
    return family_class(config.kind)(config)


def load_generator(directory: str | Path, device=None) -> Generator:
    return Generator.from_pretrained(directory, device)
