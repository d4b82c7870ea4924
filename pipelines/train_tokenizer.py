"""`tessera train-tokenizer` (VQ-GAN training on the shared Trainer) and `tessera reconstruct`.

The task trains two modules with two optimizers, as in VQGAN (Esser et al. 2021): "model" (the
VQGAN autoencoder + quantiser) on ``VQGANLoss.generator_loss`` and "disc" (the discriminator, plus the
loss's LeCam statistics) on ``VQGANLoss.discriminator_loss``. The generator loss runs the
discriminator frozen, so each loss reaches only its own optimizer's parameters.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from pipelines.config import load_run_config, to_dict
from pipelines.data import DataConfig, build_image_dataset, sample_weights
from pipelines.train_utils import exit_status
from pipelines.trainer import TrainConfig, Trainer, adamw
from tokenizer import VQGAN, LossConfig, VQGANConfig, VQGANLoss

logger = logging.getLogger(__name__)
SECTIONS = {"model": VQGANConfig, "loss": LossConfig, "train": TrainConfig, "data": DataConfig}
SAMPLE_COUNT = 8   # images in the periodic reconstruction grid


def psnr(images_B3HW: torch.Tensor, recon_B3HW: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1], measured on [0, 1] (peak 1)."""
    x = (images_B3HW.detach().float() + 1) / 2
    y = (recon_B3HW.detach().float().clamp(-1, 1) + 1) / 2
    mse_B = (x - y).square().flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1.0 / mse_B)).mean()


def reconstruct(model: VQGAN, images_B3HW: torch.Tensor) -> torch.Tensor:
    """images -> ids -> images, through the public encode/decode API (no training statistics)."""
    with torch.no_grad():
        if model.is_multiscale:
            return model.decode_scales(model.encode_scales(images_B3HW))
        return model.decode(model.encode(images_B3HW))


class DiscriminatorStep(nn.Module):
    """The "disc" module: VQGANLoss's discriminator (and LeCam EMAs) behind a forward, so that DDP
    sees the discriminator's forward and synchronises its gradients."""

    def __init__(self, loss: VQGANLoss):
        super().__init__()
        self.loss = loss

    def forward(self, images: torch.Tensor, recon: torch.Tensor, step: int) -> torch.Tensor:
        return self.loss.discriminator_loss(images, recon, step)


class TokenizerTask:
    """TrainTask for the VQ-GAN (see pipelines/trainer.py)."""
    throughput_unit = "images"

    def __init__(self, model: VQGAN, loss: VQGANLoss, sample_images: torch.Tensor | None = None):
        self.model, self.loss, self.disc = model, loss, DiscriminatorStep(loss)
        self.net, self.disc_net = self.model, self.disc   # replaced by the wrapped modules in bind_modules
        self.sample_images = sample_images
        self.metrics: dict[str, torch.Tensor] = {}
        self.memory_format = torch.contiguous_format

    def compile_modules(self, backend: str = "inductor") -> None:
        """``train.compile``: NHWC layout and compiled conv stacks (``VQGAN.compile_conv_stacks``), and the
        LPIPS network likewise (``VQGANLoss.compile_perceptual``). ``backend``: torch.compile's."""
        self.model.compile_conv_stacks(channels_last=True, backend=backend)
        self.loss.compile_perceptual(channels_last=True, backend=backend)
        self.loss.discriminator.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "disc": self.disc}

    def bind_modules(self, prepared: dict[str, nn.Module]) -> None:
        self.net, self.disc_net = prepared["model"], prepared["disc"]

    def optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": adamw(self.model, train),
                "disc": adamw(self.loss.discriminator, train, lr=train.lr * self.loss.config.disc_lr_ratio)}

    def train_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        images = batch[0].contiguous(memory_format=self.memory_format)
        out = self.net(images)
        g = self.loss.generator_loss(images, out.recon, out.quant_loss, self.model.last_layer, step)
        if self.loss.disc_active(step):
            d = self.disc_net(images, out.recon.detach(), step)
        else:  # no discriminator forward at all before disc_start (DDP expects grads after a forward)
            d = self.loss.discriminator_loss(images, out.recon.detach(), step)
        self.metrics = {**g.metrics, **d.metrics, "psnr": psnr(images, out.recon),
                        **{f"vq/{k}": v.detach().float() for k, v in out.stats.items()}}
        self.metrics.pop("loss", None)   # logged as loss/model
        return {"model": g.loss, "disc": d.loss}

    def save_model(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        save_tokenizer(modules["model"], out_dir)

    def sample(self, step: int, out_dir: Path) -> None:
        if self.sample_images is None:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            images = self.sample_images.to(device)
            recon = reconstruct(self.model, images)
        finally:
            self.model.train(was_training)
        grid = torch.cat([images, recon.to(images.dtype)]).float()   # row 1: inputs, row 2: reconstructions
        save_image((grid + 1) / 2, out_dir / f"step-{step:07d}.png", nrow=len(images))


def save_tokenizer(model: VQGAN, out_dir: Path) -> None:
    """``VQGAN.save`` into a temp dir, then move each file into place atomically (weights first); logs where."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as tmp:
        fingerprint = model.save(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            os.replace(Path(tmp) / name, out_dir / name)
    logger.info("saved tokenizer to %s (%s)", out_dir, fingerprint)


def _sample_images(data: DataConfig) -> torch.Tensor | None:
    try:
        val = build_image_dataset(data, "val")
    except ValueError as e:
        logger.warning("no validation images for sample grids (%s)", e)
        return None
    n = min(SAMPLE_COUNT, len(val))
    return torch.stack([val[i][0] for i in range(n)]) if n else None


def run_train(args: argparse.Namespace) -> int:
    cfg = load_run_config(args, SECTIONS)
    model_cfg, loss_cfg, train_cfg, data_cfg = cfg["model"], cfg["loss"], cfg["train"], cfg["data"]
    if data_cfg.resolution != model_cfg.resolution:
        raise ValueError(f"data.resolution {data_cfg.resolution} differs from model.resolution "
                         f"{model_cfg.resolution}; set both to the same size")
    if train_cfg.distributed != "ddp":
        raise ValueError("train-tokenizer supports train.distributed: ddp only (the tokenizer is small; "
                         "the adaptive GAN weight needs the full decoder's last layer)")
    torch.manual_seed(train_cfg.seed)   # the init; the Trainer re-seeds data order and dropout itself
    model, loss = VQGAN(model_cfg), VQGANLoss(loss_cfg)
    dataset = build_image_dataset(data_cfg, "train")
    weights = sample_weights(dataset) if data_cfg.balanced else None
    if data_cfg.balanced and weights is None:
        raise ValueError(f"data.balanced needs class labels; dataset '{data_cfg.dataset}' has none")
    task = TokenizerTask(model, loss, _sample_images(data_cfg) if train_cfg.sample_every else None)
    run_config = {name: to_dict(c) for name, c in cfg.items()}
    trainer = Trainer(train_cfg, args.output, task, dataset, resume=args.resume, run_config=run_config,
                      sampler_weights=weights)
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        how = f"stopped by {result['stopped_by']}" if result["stopped_by"] else "done"
        shown = {k: round(v, 4) for k, v in result.items()
                 if k in ("loss/model", "loss/disc", "psnr", "vq/perplexity", "vq/usage") and isinstance(v, float)}
        print(f"{how} at step {result['step']}: {shown}")
        print(f"tokenizer saved to {args.output} (VQGAN.from_pretrained); checkpoint: {result['checkpoint']}")
    return exit_status(result)


def run_reconstruct(args: argparse.Namespace) -> int:
    from pipelines.images import image_to_tensor, open_image, output_image_path, tensor_to_pil
    from pipelines.loading import load_tokenizer, pick_device

    out = output_image_path(args.out)
    device = pick_device(args.device)
    model = load_tokenizer(args.tokenizer, device)
    image = image_to_tensor(open_image(args.image), model.config.resolution).unsqueeze(0).to(device)
    recon = reconstruct(model, image).float()
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(torch.cat([image, recon], dim=-1))[0].save(out)   # input | reconstruction
    print(f"PSNR {psnr(image, recon).item():.2f} dB; wrote {out} (input | reconstruction, "
          f"{model.config.resolution}px, {model.grid_size}x{model.grid_size} tokens)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a VQ-GAN tokenizer",
                       description="Train a VQ-GAN tokenizer; DIR becomes a model dir (config.json + "
                                   "model.safetensors) with checkpoints/, metrics.jsonl and samples/.")
    p.add_argument("--config", type=Path, help="run config YAML (sections model, loss, train, data)")
    p.add_argument("--output", required=True, type=Path, help="run / model dir")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --output")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4")
    p.set_defaults(func=run_train)

    r = sub.add_parser("reconstruct", help="encode and decode one image with a tokenizer",
                       description="Write input | reconstruction side by side and print the PSNR.")
    r.add_argument("--tokenizer", required=True, type=Path, help="tokenizer model dir")
    r.add_argument("--image", required=True, type=Path, help="input image (any format PIL reads)")
    r.add_argument("--out", required=True, type=Path, help="output PNG")
    r.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    r.set_defaults(func=run_reconstruct)
