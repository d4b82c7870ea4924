"""VQ-GAN training losses (Esser et al. 2021, eq. 5-7; LlamaGen's recipe; LeCam, Tseng et al. 2021).

generator:      L_G = w_rec * rec(x, x_hat) + w_p * LPIPS(x, x_hat) + quant_loss
                      + w_disc * lambda * (-E[D(x_hat)])                      (after disc_start)
                lambda = ||grad_last rec_terms|| / (||grad_last (-E[D(x_hat)])|| + 1e-4), clamped (eq. 7)
discriminator:  L_D = 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])          (hinge)
                      + w_lecam (E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(x_hat))^2])
Images are (B, 3, H, W) in [-1, 1]. ``disc_weight`` scales the generator's adversarial term only; the
discriminator's own step size is set by ``disc_lr_ratio`` (the trainer's disc optimizer lr = lr * ratio).
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .discriminator import NORMS, build_discriminator

logger = logging.getLogger(__name__)
VGG16_FILE = "vgg16-397923af.pth"   # torchvision's ImageNet VGG16 weights, as torch.hub caches them


@dataclass
class LossConfig:
    reconstruction: str = "l1"          # "l1" | "l2" pixel loss; l1 keeps edges sharper
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0      # LPIPS-VGG; needs VGG16 weights on disk (0 turns it off)
    lpips_weights: str = ""             # path to vgg16-397923af.pth; "" = torch.hub cache (never downloaded)
    lpips_random_backbone: bool = False  # tests only: LPIPS on a random VGG (meaningless as a loss)
    codebook_weight: float = 1.0        # weight of the quantiser loss (codebook + commitment)
    disc_type: str = "patchgan"         # "patchgan" | "timm:<arch>" (timm features_only backbone + heads)
    disc_weight: float = 0.5            # generator's adversarial weight (LlamaGen 0.5); 0 = no GAN
    disc_start: int = 2000              # step at which the GAN starts: let reconstructions form first
    adaptive_weight: bool = True        # VQGAN's gradient-norm balance of GAN vs reconstruction
    adaptive_weight_max: float = 1e4    # clamp of that ratio (taming's value)
    lecam_weight: float = 0.0           # LeCam regulariser: keeps D's logits near their EMAs (small data)
    lecam_decay: float = 0.999          # EMA decay of the mean real/fake logits
    disc_channels: int = 64             # PatchGAN base width / timm head width
    disc_layers: int = 3                # PatchGAN halving convs: receptive field ~ 2**layers * 4 px
    disc_norm: str = "group"            # "group" | "batch" | "none"; group: per-sample, no SyncBN needed
    disc_weights: str = ""              # timm only: local pretrained checkpoint ("" = random init)
    disc_freeze_backbone: bool = False  # timm only: train heads only (use with pretrained weights)
    disc_lr_ratio: float = 1.0          # discriminator lr = train.lr * ratio (read by the trainer)

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"unknown loss.reconstruction '{self.reconstruction}'; valid: l1, l2")
        for name in ("reconstruction_weight", "perceptual_weight", "codebook_weight", "disc_weight",
                     "lecam_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.disc_type == "patchgan" or re.fullmatch(r"timm:\S+", self.disc_type)):
            raise ValueError(f"unknown loss.disc_type '{self.disc_type}'; valid: 'patchgan' or 'timm:<arch>'")
        if self.disc_norm not in NORMS:
            raise ValueError(f"unknown loss.disc_norm '{self.disc_norm}'; valid: {', '.join(NORMS)}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"loss.lecam_decay must be in [0, 1), got {self.lecam_decay}")
        for name in ("disc_channels", "disc_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"loss.{name} must be >= 1, got {getattr(self, name)}")
        if self.disc_lr_ratio <= 0 or self.adaptive_weight_max <= 0:
            raise ValueError("loss.disc_lr_ratio and loss.adaptive_weight_max must be > 0")


class LossOutput(NamedTuple):
    loss: torch.Tensor                  # scalar to backpropagate
    metrics: dict[str, torch.Tensor]    # detached scalars for logging


def build_lpips(weights: str = "", random_backbone: bool = False) -> nn.Module:
    """LPIPS-VGG (Zhang et al. 2018) with the lpips package's linear layers; the VGG16 trunk comes from
    ``weights`` or the torch.hub cache, never from the network. Frozen, eval mode, on the CPU.

    Built on the meta device and then filled by one strict ``load_state_dict`` (scaling constants,
    trunk, linear layers): this skips initialising VGG16's unused 120M-parameter classifier and
    guarantees that no tensor is left uninitialised. Raises ValueError naming the fix when the VGG16
    weights cannot be found.
    """
    path = None
    if not random_backbone:
        path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
        if not path.is_file():
            where = f"at loss.lpips_weights={weights}" if weights else f"in the torch hub cache ({path})"
            raise ValueError(
                f"the perceptual (LPIPS) loss needs torchvision's pretrained VGG16 weights ({VGG16_FILE}), "
                f"which are not {where}, and this machine cannot download them. Provide the file with "
                f"--set loss.lpips_weights=/path/to/{VGG16_FILE}, or turn the perceptual loss off with "
                f"--set loss.perceptual_weight=0")
    with warnings.catch_warnings():   # torchvision's "pretrained is deprecated" warnings from inside lpips
        warnings.simplefilter("ignore", UserWarning)
        import lpips
        with torch.device("meta"):
            net = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    net = net.to_empty(device="cpu")
    if path is None:
        trunk = _random_vgg_trunk(net.net)
    else:
        trunk = _vgg_trunk_state(net.net, path)
        logger.info("LPIPS: VGG16 weights from %s", path)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    state = {f"scaling_layer.{k}": v for k, v in lpips.ScalingLayer().state_dict().items()}
    state.update({f"net.{k}": v for k, v in trunk.items()})
    for key, value in torch.load(lin_path, map_location="cpu", weights_only=True).items():
        state[key] = value   # "lin<i>.*", also registered as "lins.<i>.*" (same module)
        state[re.sub(r"^lin(\d+)\.", r"lins.\1.", key)] = value
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not torchvision's VGG16 state dict: {e}") from None
    return net.eval().requires_grad_(False)


def _random_vgg_trunk(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Tests only: freshly initialised conv weights (PyTorch's default init, global RNG)."""
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return trunk.state_dict()


def _vgg_trunk_state(trunk: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """torchvision ``features.<i>.*`` keys -> lpips' ``slice<j>.<i>.*`` names (classifier dropped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)   # tensors only, no code
    slice_of = {idx: name for name, child in trunk.named_children() for idx, _ in child.named_children()}
    mapped = {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if m and m.group(1) in slice_of:
            mapped[f"{slice_of[m.group(1)]}.{m.group(1)}.{m.group(2)}"] = value
    return mapped


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on ``module``'s parameters (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (itself otherwise)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN eq. 7: ||grad_last rec|| / (||grad_last g|| + 1e-4), clamped to [0, max], detached.

    Returns 0 when gradients are unavailable (no_grad / eval), as taming does.
    """
    if not (torch.is_grad_enabled() and rec_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=rec_loss.device)
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class VQGANLoss(nn.Module):
    """Holds the discriminator (trained by its own optimizer) and the frozen LPIPS network.

    LPIPS is deliberately not a registered submodule: it is fixed, rebuilt from its own weights, and
    would add ~60 MB to every checkpoint; it follows the inputs' device on first use.
    """

    def __init__(self, config: LossConfig):
        super().__init__()
        c = self.config = config
        self.discriminator = build_discriminator(c.disc_type, c.disc_channels, c.disc_layers, c.disc_norm,
                                                 c.disc_weights, c.disc_freeze_backbone)
        self._lpips = [build_lpips(c.lpips_weights, c.lpips_random_backbone)] if c.perceptual_weight > 0 else []
        # LeCam EMAs are persistent: an exact resume needs them
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))
        self.register_buffer("lecam_updates", torch.zeros((), dtype=torch.long))

    def disc_active(self, step: int) -> bool:
        return self.config.disc_weight > 0 and step >= self.config.disc_start

    def compile_perceptual(self, channels_last: bool = True, backend: str = "inductor") -> None:
        """For training speed (``train.compile``): the frozen LPIPS network with NHWC weights (VGG16's convs on
        cuDNN's tensor-core layout; the images and reconstructions come NHWC when the VQGAN's conv stacks are
        compiled) and torch.compile of its forward (the scaling, the per-layer unit normalisation, squared
        differences and linear heads fused around the convs). Values as before up to rounding; nothing when the
        perceptual loss is off. ``backend``: torch.compile's (tests use "aot_eager")."""
        if not self._lpips:
            return
        net = self._lpips[0]
        if channels_last:
            net.to(memory_format=torch.channels_last)
        self._lpips[0] = torch.compile(net, backend=backend)

    def perceptual_loss(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance (scalar); needs perceptual_weight > 0 (or the random test backbone)."""
        if not self._lpips:
            raise ValueError("the perceptual loss is off (loss.perceptual_weight=0)")
        net = self._lpips[0]
        if next(net.parameters()).device != images.device:
            self._lpips[0] = net = net.to(images.device)
        return net(images, recon).mean()

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, quant_loss: torch.Tensor,
                       last_layer: torch.Tensor | None, step: int) -> LossOutput:
        """Autoencoder objective; the discriminator runs frozen, so this gives it no gradients."""
        c = self.config
        diff = recon.float() - images.float()
        rec = diff.abs().mean() if c.reconstruction == "l1" else diff.square().mean()
        zero = rec.new_zeros(())
        perc = self.perceptual_loss(images, recon) if c.perceptual_weight > 0 else zero
        nll = c.reconstruction_weight * rec + c.perceptual_weight * perc
        g_loss, d_weight = zero, zero
        if self.disc_active(step):
            disc = _unwrap(self.discriminator)   # a DDP wrapper would wait for grads this pass never makes
            with frozen(disc):
                g_loss = -disc(recon).float().mean()
            if c.adaptive_weight:
                if last_layer is None:
                    raise ValueError("adaptive_weight needs last_layer (pass model.last_layer)")
                d_weight = adaptive_weight(nll, g_loss, last_layer, c.adaptive_weight_max)
            else:
                d_weight = rec.new_ones(())
        loss = nll + c.codebook_weight * quant_loss + c.disc_weight * d_weight * g_loss
        metrics = {"rec_loss": rec, "perceptual_loss": perc, "nll_loss": nll, "quant_loss": quant_loss,
                   "g_loss": g_loss, "d_weight": d_weight, "loss": loss}
        return LossOutput(loss, {k: v.detach().float() for k, v in metrics.items()})

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, step: int) -> LossOutput:
        """Hinge loss (+ LeCam) on real images vs detached reconstructions; 0 before disc_start."""
        c = self.config
        if not self.disc_active(step):
            zero = torch.zeros((), device=images.device, requires_grad=True)   # backward-able, no grads
            return LossOutput(zero, {"disc_loss": zero.detach()})
        real, fake = images.detach(), recon.detach().to(images.dtype)
        if c.disc_norm == "batch":   # batch statistics of each half alone (as taming), as the G step sees fakes
            logits_real, logits_fake = self.discriminator(real).float(), self.discriminator(fake).float()
        else:                        # per-sample norms keep the halves apart: one forward over both
            logits_real, logits_fake = self.discriminator(torch.cat([real, fake])).float().chunk(2)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        metrics = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        loss = d_loss
        if c.lecam_weight > 0:
            if self.training:
                self._update_lecam(logits_real.mean().detach(), logits_fake.mean().detach())
            lecam = (F.relu(logits_real - self.lecam_ema_fake).square().mean()
                     + F.relu(self.lecam_ema_real - logits_fake).square().mean())
            loss = loss + c.lecam_weight * lecam
            metrics["lecam_loss"] = lecam
        return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})

    @torch.no_grad()
    def _update_lecam(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        decay = torch.where(self.lecam_updates > 0, self.config.lecam_decay, 0.0)  # first update: copy
        self.lecam_ema_real.copy_(decay * self.lecam_ema_real + (1 - decay) * real)
        self.lecam_ema_fake.copy_(decay * self.lecam_ema_fake + (1 - decay) * fake)
        self.lecam_updates.add_(1)
