"""A small image classifier trained from scratch on the project's own data: the feature space of the
evaluation metrics when Inception's weights cannot be had (see DESIGN.md, "Data and weights offline").

The network is a timm ResNet (default: a half-width ``resnet18d``, deep 3x3 stem, BasicBlocks) built with
``pretrained=False`` and adapted to 64 px images by dropping the stem's max-pool, so the last stage
still sees a 4x4 map. ``features`` are the globally pooled penultimate activations (B, F), F = the last
stage's width; ``logits`` are (B, C). Images are float (B, 3, H, W) in [-1, 1] at ``config.resolution``.

A classifier dir holds ``config.json`` + ``model.safetensors`` (strict load, no pickle) and, after
``tessera train-classifier``, ``metrics.json`` with the val accuracy. Its feature space is named by
``feature_space`` = "tessera-<data>-classifier <first 12 hex of the weights' SHA-256>", so every number
measured in it says which network made it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.checkpoint import atomic_write_text, load_model_dir, save_model_dir
from pipelines.config import from_dict, load_sections, to_dict
from pipelines.data import DataConfig, build_image_dataset, sample_weights
from pipelines.train_utils import exit_status
from pipelines.trainer import Trainer, TrainConfig, adamw

logger = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    arch: str = "resnet18d"          # a timm ResNet; built from scratch (pretrained=False), never downloaded
    channels: tuple[int, ...] = (32, 64, 128, 256)    # stage widths (half resnet18's); F = channels[-1]
    stem_width: int = 16             # deep stem width (timm); its output is 2 * stem_width channels
    stem_pool: bool = False          # ImageNet's stride-2 max-pool after the stem; off for 64 px inputs
    drop_rate: float = 0.2           # dropout before the last linear layer: the dataset is small
    num_classes: int = 0             # 0 in a YAML: taken from the dataset at training time
    resolution: int = 64             # input side; other sizes are resized to it
    dataset: str = "emoji"           # what it was trained on (names the feature space)
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        self.channels, self.class_names = tuple(self.channels), tuple(self.class_names)
        if not self.channels or min(self.channels) < 1 or self.stem_width < 1 or self.resolution < 8:
            raise ValueError("model.channels and stem_width must be positive and resolution >= 8")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.class_names and self.num_classes != len(self.class_names):
            raise ValueError(f"model.num_classes {self.num_classes} != {len(self.class_names)} class names")


@dataclass
class AugmentConfig:
    max_shift: float = 0.0625        # random translation, fraction of the side (emoji sit centred on white)
    scale_range: float = 0.1         # random zoom in [1 - r, 1 + r]
    label_smoothing: float = 0.1     # cross-entropy label smoothing

    def __post_init__(self):
        for name, value, top in (("max_shift", self.max_shift, 0.5), ("scale_range", self.scale_range, 1.0),
                                 ("label_smoothing", self.label_smoothing, 1.0)):
            if not 0.0 <= value < top:
                raise ValueError(f"augment.{name} must be in [0, {top}), got {value}")


class EmojiClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.num_classes < 1:
            raise ValueError("the classifier needs num_classes >= 1 (set it, or train it on a dataset)")
        self.config = config
        if not timm.is_model(config.arch):
            raise ValueError(f"unknown timm architecture '{config.arch}'")
        self.net = timm.create_model(config.arch, pretrained=False, num_classes=config.num_classes,
                                     channels=config.channels, stem_width=config.stem_width,
                                     drop_rate=config.drop_rate)
        if not config.stem_pool:
            self.net.maxpool = nn.Identity()

    def _prepare(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images_B3HW.shape)}")
        r = self.config.resolution
        x = images_B3HW.to(next(self.parameters()).device, torch.float32)
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Training forward: images -> logits (B, C)."""
        return self.net(self._prepare(images_B3HW))

    @torch.no_grad()
    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Penultimate (globally pooled) features (B, F) float32 on the model's device."""
        net = self.net
        return net.forward_head(net.forward_features(self._prepare(images_B3HW)), pre_logits=True).float()

    @torch.no_grad()
    def logits(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) float32."""
        return self.net(self._prepare(images_B3HW)).float()

    @torch.no_grad()
    def classify(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, F), logits (B, C)) from one forward pass (eval mode: the head's dropout is off)."""
        feats = self.features(images_B3HW)
        return feats, self.net.get_classifier()(feats).float()

    def fingerprint(self) -> str:
        """SHA-256 of the weights: of the model.safetensors file it was loaded from (so a 16-bit copy is
        a feature space of its own), else of the bytes ``save`` would write."""
        if getattr(self, "_file_sha256", None):
            return self._file_sha256
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return hashlib.sha256(st_save(state)).hexdigest()

    @property
    def feature_space(self) -> str:
        name = "emoji" if self.config.dataset == "emoji" else Path(self.config.dataset).name or "data"
        return f"tessera-{name}-classifier {self.fingerprint()[:12]}"

    def save(self, directory: str | Path) -> None:
        save_model_dir(directory, to_dict(self.config), self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "EmojiClassifier":
        config, state = load_model_dir(directory)
        model = cls(from_dict(ClassifierConfig, config, f"{directory}/config.json"))
        model.load_state_dict(state, strict=True)      # 16-bit files load into the fp32 model
        model._file_sha256 = hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()
        return model.to(device).eval().requires_grad_(False)


def augment(images_B3HW: torch.Tensor, aug: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random zoom + translation, one affine warp per image; edge pixels extend (emoji: white)."""
    b, dev = images_B3HW.shape[0], images_B3HW.device
    u = torch.rand(b, 3, generator=generator, device=generator.device if generator is not None else dev).to(dev) * 2 - 1
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / (1.0 + aug.scale_range * u[:, 0])
    theta[:, :, 2] = 2 * aug.max_shift * u[:, 1:]          # grid units: the side is 2 wide
    grid = F.affine_grid(theta, list(images_B3HW.shape), align_corners=False)
    return F.grid_sample(images_B3HW.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def accuracy_report(model: EmojiClassifier, dataset: Dataset, batch_size: int = 256) -> dict:
    """Accuracy of ``model`` on ``dataset`` (items (image, label)): overall, per class, and balanced (the mean
    over the classes present)."""
    correct = torch.zeros(model.config.num_classes)
    total = torch.zeros(model.config.num_classes)
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        pred = model.logits(images).argmax(-1).cpu()
        total += torch.bincount(labels, minlength=len(total)).float()
        correct += torch.bincount(labels[pred == labels], minlength=len(total)).float()
    names = model.config.class_names or [str(i) for i in range(len(total))]
    per_class = {n: (float(c / t) if t else None) for n, c, t in zip(names, correct, total)}
    present = [v for v in per_class.values() if v is not None]
    return {"accuracy": float(correct.sum() / total.sum()), "balanced_accuracy": sum(present) / len(present),
            "num_images": int(total.sum()), "per_class": per_class}


class ClassifierTask:
    """The TrainTask of ``pipelines.trainer``: cross-entropy on augmented images."""
    throughput_unit = "images"

    def __init__(self, model: EmojiClassifier, aug: AugmentConfig):
        self.model, self.aug, self.metrics = model, aug, {}
        self.forward = model

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def bind_modules(self, prepared: dict[str, nn.Module]) -> None:
        self.forward = prepared["model"]

    def optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": adamw(self.model, train)}

    def train_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.forward(augment(images, self.aug).contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.aug.label_smoothing)
        self.metrics = {"accuracy": (logits.argmax(-1) == labels).float().mean()}
        return {"model": loss}

    def save_model(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        modules["model"].save(out_dir)


def train_classifier(model_cfg: ClassifierConfig, aug: AugmentConfig, train: TrainConfig, data: DataConfig,
                     output_dir: str | Path, resume: bool = False, train_set: Dataset | None = None,
                     val_set: Dataset | None = None) -> dict:
    """Train from scratch, save the model dir, measure val accuracy, write ``metrics.json``; return it
    (``{"stopped": Trainer.fit()'s result}`` when a signal cut the run short: its checkpoint resumes).

    ``train_set`` / ``val_set`` default to ``build_image_dataset(data, "train" / "val")``.
    """
    train_set = train_set if train_set is not None else build_image_dataset(data, "train")
    val_set = val_set if val_set is not None else build_image_dataset(data, "val")
    names = tuple(train_set.class_names)
    if model_cfg.num_classes not in (0, len(names)):
        raise ValueError(f"model.num_classes is {model_cfg.num_classes} but the dataset has {len(names)} classes")
    model_cfg = dataclasses.replace(model_cfg, num_classes=len(names), class_names=names,
                                    resolution=data.resolution, dataset=data.dataset)
    torch.manual_seed(train.seed)        # the initial weights: same seed, same run (as the other trainers)
    model = EmojiClassifier(model_cfg).to(memory_format=torch.channels_last)
    run_config = {"model": to_dict(model_cfg), "augment": to_dict(aug), "train": to_dict(train), "data": to_dict(data)}
    weights = sample_weights(train_set) if data.balanced else None
    trainer = Trainer(train, output_dir, ClassifierTask(model, aug), train_set, resume=resume,
                      run_config=run_config, sampler_weights=weights)
    last = trainer.fit()
    if last["signal"]:       # cut short by a signal (the Trainer said where): no val pass over an unfinished model
        return {"stopped": last}
    if not trainer.accelerator.is_main_process:
        return {}
    best = EmojiClassifier.from_pretrained(output_dir, trainer.accelerator.device)
    report = {"feature_space": best.feature_space, "steps": last.get("step"),
              "train_accuracy_last_log": last.get("accuracy"), "val": accuracy_report(best, val_set)}
    atomic_write_text(Path(output_dir) / "metrics.json", json.dumps(report, indent=1) + "\n")
    logger.info("val accuracy %.4f (class-balanced %.4f) on %d images", report["val"]["accuracy"],
                report["val"]["balanced_accuracy"], report["val"]["num_images"])
    return report


# ---- CLI ---------------------------------------------------------------------------------------
SECTIONS = {"model": ClassifierConfig, "augment": AugmentConfig, "train": TrainConfig, "data": DataConfig}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-classifier", help="train the evaluation classifier (feature space of the metrics)",
                       description="Train a small timm ResNet from scratch; writes config.json, model.safetensors "
                                   "and metrics.json (val accuracy) to --output.")
    p.add_argument("--config", required=True, metavar="YAML", help="e.g. configs/classifier/emoji.yaml")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--max-steps", type=int, metavar="N", help="override train.max_steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    cfg = load_sections(args.config, SECTIONS, overrides)
    report = train_classifier(cfg["model"], cfg["augment"], cfg["train"], cfg["data"], args.output, args.resume)
    if "stopped" in report:
        return exit_status(report["stopped"])
    if report:
        val = report["val"]
        print(f"val accuracy {val['accuracy']:.4f}, class-balanced {val['balanced_accuracy']:.4f} "
              f"({val['num_images']} images); per class: "
              + ", ".join(f"{k} {v:.3f}" for k, v in val["per_class"].items() if v is not None))
        print(f"wrote {args.output}/ (feature space: {report['feature_space']})")
    return 0
