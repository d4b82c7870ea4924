"""VQ-GAN tokenizer (Esser et al. 2021; LlamaGen VQ-16 quantiser; VAR multi-scale quantiser).

images (B, 3, H, W) in [-1, 1] -> Encoder -> quant_conv (z_channels -> codebook_dim) -> quantizer
-> post_quant_conv -> Decoder -> images. Single-scale ("vq") ids are (B, h, w) long; multiscale ids
are a list of (B, s_k, s_k) long, coarse -> fine. Letters: B batch, C channels, h w grid, s scale side.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .autoencoder import Decoder, Encoder
from .quantize import VAR_SCALES, MultiScaleQuantizer, NextScale, VectorQuantizer

logger = logging.getLogger(__name__)
QUANTIZERS = ("vq", "multiscale")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class VQGANConfig:
    resolution: int = 64                 # image side in pixels (square images)
    base_channels: int = 64              # width of the first encoder level; sets model size
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)   # width per level; downsampling factor = 2 ** (len - 1)
    num_res_blocks: int = 2              # ResnetBlocks per encoder level (decoder: one more)
    mid_attention: bool = True           # self-attention at the bottleneck: global context for the grid
    z_channels: int = 256                # encoder output width before the low-dim quant_conv
    codebook_size: int = 1024            # V: vocabulary of the generators
    codebook_dim: int = 8                # LlamaGen: low-dim lookup keeps codes well used
    l2_normalize: bool = True            # vq: cosine lookup + unit codes (LlamaGen); multiscale: cosine pick only
    commitment_beta: float = 0.25        # VQ-VAE beta: pulls the encoder towards its codes
    entropy_weight: float = 0.0          # vq only: MaskGIT entropy loss, spreads usage over the codebook
    restart_dead_codes: bool = True      # re-seed codes unused for usage_window steps from recent inputs
    quantizer: str = "vq"                # "vq" | "multiscale" (VAR residual pyramid)
    scales: tuple[int, ...] = ()         # multiscale: sides coarse -> fine, last == grid_size ((): VAR's for 16x16)
    phi_count: int = 4                   # multiscale: partially shared Phi convs (VAR's share_quant_resi)
    phi_ratio: float = 0.5               # multiscale: Phi mix x*(1-r) + conv(x)*r
    usage_window: int = 100              # training steps without use after which a code counts as dead
    entropy_temperature: float = 0.01    # softmax temperature of the entropy loss (LlamaGen's value)

    def __post_init__(self):
        self.channel_mult, self.scales = tuple(self.channel_mult), tuple(self.scales)
        positive = ("resolution", "base_channels", "num_res_blocks", "z_channels", "codebook_dim",
                    "phi_count", "usage_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"model.channel_mult must be a non-empty list of positive ints, got {list(self.channel_mult)}")
        if self.codebook_size < 2:
            raise ValueError(f"model.codebook_size must be >= 2, got {self.codebook_size}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"model.resolution {self.resolution} is not divisible by the downsampling factor "
                             f"{self.downsample_factor} (= 2 ** (len(channel_mult) - 1))")
        for name in ("commitment_beta", "entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"model.entropy_temperature must be > 0, got {self.entropy_temperature}")
        if not 0.0 <= self.phi_ratio <= 1.0:
            raise ValueError(f"model.phi_ratio must be in [0, 1], got {self.phi_ratio}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown model.quantizer '{self.quantizer}'; valid: {', '.join(QUANTIZERS)}")
        if self.quantizer == "vq":
            if self.scales:
                raise ValueError("model.scales is only used by quantizer 'multiscale'; remove it or set quantizer")
            return
        if self.entropy_weight > 0:
            raise ValueError("model.entropy_weight > 0 is only supported by quantizer 'vq'")
        if not self.scales:
            if self.grid_size != VAR_SCALES[-1]:
                raise ValueError(f"model.scales must be set for a {self.grid_size}x{self.grid_size} grid "
                                 f"(e.g. [1, 2, 4, {self.grid_size}]); the default is VAR's for 16x16")
            self.scales = VAR_SCALES
        if min(self.scales) < 1 or any(a >= b for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"model.scales must be positive and strictly increasing, got {list(self.scales)}")
        if self.scales[-1] != self.grid_size:
            raise ValueError(f"model.scales must end at the grid size {self.grid_size} "
                             f"(= resolution / downsampling factor), got {list(self.scales)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor


class VQGANOutput(NamedTuple):
    recon: torch.Tensor                  # (B, 3, H, W), unclamped (the losses see the raw output)
    quant_loss: torch.Tensor             # scalar: codebook + commitment (+ entropy)
    ids: object                          # vq: (B, h, w) long; multiscale: list of (B, s, s) long
    stats: dict[str, torch.Tensor]       # detached quantiser statistics (perplexity, usage, ...)


class VQGAN(nn.Module):
    """Image tokenizer; also the ``ScaleCodec`` of VAR when ``config.quantizer == "multiscale"``."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        c = self.config = config
        self.codebook_size, self.codebook_dim, self.grid_size = c.codebook_size, c.codebook_dim, c.grid_size
        self.scales = c.scales
        self.encoder = Encoder(c.base_channels, c.channel_mult, c.num_res_blocks, c.z_channels, c.mid_attention)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_dim, 1)
        if c.quantizer == "vq":
            self.quantizer = VectorQuantizer(c.codebook_size, c.codebook_dim, c.l2_normalize, c.commitment_beta,
                                             c.entropy_weight, c.entropy_temperature, c.restart_dead_codes,
                                             c.usage_window)
        else:
            self.quantizer = MultiScaleQuantizer(c.codebook_size, c.codebook_dim, c.scales, c.phi_count, c.phi_ratio,
                                                 c.l2_normalize, c.commitment_beta, c.restart_dead_codes,
                                                 c.usage_window)
        self.post_quant_conv = nn.Conv2d(c.codebook_dim, c.z_channels, 1)
        self.decoder = Decoder(c.base_channels, c.channel_mult, c.num_res_blocks, c.z_channels, c.mid_attention)

    @property
    def is_multiscale(self) -> bool:
        return self.config.quantizer == "multiscale"

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last conv weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    # ---- training -------------------------------------------------------------------------------
    def compile_conv_stacks(self, channels_last: bool = True, backend: str = "inductor") -> None:
        """For training speed: NHWC weights (cuDNN's tensor-core layout; feed NHWC images too) and
        torch.compile of the encoder and of the decoder up to its last conv, in place (state_dict keys
        and values unchanged). The quantizer stays eager (its restart bookkeeping), and so does the
        decoder's last conv: the adaptive GAN weight differentiates the loss w.r.t. that conv's weight
        with ``retain_graph``, which a compiled backward can refuse (donated buffers: it did with the
        whole VQGAN compiled); that gradient never reaches the compiled part, whose backward then runs
        once, in the step's backward. ``backend``: torch.compile's (tests use "aot_eager")."""
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.encoder.compile(backend=backend)
        self.decoder.features = torch.compile(self.decoder.features, backend=backend)

    def forward(self, images_B3HW: torch.Tensor, generator: torch.Generator | None = None) -> VQGANOutput:
        """Reconstruct images; ``generator`` drives dead-code restarts (training mode only)."""
        q = self.quantizer(self._latent(images_B3HW), generator=generator)
        recon = self.decoder(self.post_quant_conv(q.z_q))
        return VQGANOutput(recon, q.loss, q.ids, q.stats)

    def _latent(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        _check_images(images_B3HW, self.config.resolution)
        return self.quant_conv(self.encoder(images_B3HW))

    def _decode_latent(self, z_q_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q_BChw)).clamp(-1.0, 1.0)

    # ---- single-scale API -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> ids (B, h, w) long. No statistics or restarts."""
        if self.is_multiscale:
            raise ValueError("this tokenizer is multiscale: use encode_scales(images), which returns one id map per scale")
        return self.quantizer.lookup_ids(self._latent(images_B3HW))

    def decode(self, ids_Bhw: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) long -> images (B, 3, H, W) clamped to [-1, 1]."""
        if self.is_multiscale:
            raise ValueError("this tokenizer is multiscale: the finest ids alone do not define the image; "
                             "use decode_scales(ids_list) with the ids of every scale")
        _check_ids(ids_Bhw, self.grid_size, self.codebook_size, "ids")
        return self._decode_latent(self.quantizer.embed_ids(ids_Bhw))

    # ---- multiscale API (VAR ScaleCodec) --------------------------------------------------------
    @torch.no_grad()
    def encode_scales(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> [ids (B, s_k, s_k) long for each scale, coarse -> fine]."""
        self._need_multiscale("encode_scales", "encode")
        return self.quantizer.lookup_ids(self._latent(images_B3HW))

    def decode_scales(self, ids_list: list[torch.Tensor]) -> torch.Tensor:
        """[ids (B, s_k, s_k)] for all K scales -> images (B, 3, H, W) clamped to [-1, 1]."""
        self._check_ids_list(ids_list, len(self.scales))
        return self._decode_latent(self.quantizer.f_hat_from_ids(list(ids_list)))

    @torch.no_grad()
    def next_scale_input(self, f_hat_BChw: torch.Tensor | None, ids_k_Bss: torch.Tensor, k: int) -> NextScale:
        """One VAR step, k 0-based: f_hat += Phi_k(upsample(embed(ids_k))).

        Returns (f_hat (B, C, h, w) float32, next_input (B, s_{k+1}^2, C) raster order, or None when k is
        the last scale). ``f_hat`` None starts from zeros.
        """
        self._need_multiscale("next_scale_input", "decode")
        if not 0 <= k < len(self.scales):
            raise ValueError(f"scale index k={k} is out of range: the tokenizer has {len(self.scales)} scales "
                             f"(k is 0-based)")
        _check_ids(ids_k_Bss, self.scales[k], self.codebook_size, f"ids of scale k={k}")
        return self.quantizer.next_scale_input(f_hat_BChw, ids_k_Bss, k)

    @torch.no_grad()
    def teacher_forcing_input(self, ids_list: list[torch.Tensor], check_range: bool = True) -> torch.Tensor:
        """VAR training inputs of scales 2..K: (B, sum_{k>=1} s_k^2, C), float32, from the same
        ``next_scale_input`` steps that sampling uses (so the two agree exactly). ``check_range`` False
        skips the id range check, the one host sync: for ids this tokenizer made (a token cache carries
        its fingerprint), so a training step does not wait for the GPU."""
        self._check_ids_list(ids_list, len(self.scales), check_range)
        f_hat, inputs = None, []
        for k in range(len(self.scales) - 1):   # the quantizer's next_scale_input, ids checked once above
            f_hat, nxt = self.quantizer.next_scale_input(f_hat, ids_list[k], k)
            inputs.append(nxt)
        if not inputs:
            return ids_list[0].new_zeros((ids_list[0].shape[0], 0, self.codebook_dim), dtype=torch.float32)
        return torch.cat(inputs, dim=1)

    def _need_multiscale(self, method: str, instead: str) -> None:
        if not self.is_multiscale:
            raise ValueError(f"{method}() needs a multiscale tokenizer; this one is single-scale: use {instead}()")

    def _check_ids_list(self, ids_list: list[torch.Tensor], count: int, check_range: bool = True) -> None:
        self._need_multiscale("decode_scales/teacher_forcing_input", "decode")
        if not isinstance(ids_list, (list, tuple)) or len(ids_list) != count:
            got = len(ids_list) if isinstance(ids_list, (list, tuple)) else type(ids_list).__name__
            raise ValueError(f"expected a list of {count} id maps (one per scale {list(self.scales)}), got {got}")
        for k, ids in enumerate(ids_list):
            _check_ids(ids, self.scales[k], self.codebook_size, f"ids of scale k={k}", check_range=False)
        if check_range:
            _check_range(torch.cat([ids.reshape(-1) for ids in ids_list]), self.codebook_size, "ids")   # one sync

    # ---- checkpoints ----------------------------------------------------------------------------
    def config_hash(self) -> str:
        """sha256 of the sorted config JSON, 16 hex chars: identifies the token vocabulary/geometry."""
        text = json.dumps(json.loads(json.dumps(dataclasses.asdict(self.config))), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """16 hex chars identifying this tokenizer's vocabulary: sha256 over its config AND weights, so two
        tokenizers with one config but different training differ. Computed when saved and stored in the
        weights file's metadata; a model from ``from_pretrained`` reports the stored value (so a copy
        cast to 16 bits for shipping keeps the identity of the weights its tokens were made with)."""
        if getattr(self, "_stored_fingerprint", None):
            return self._stored_fingerprint
        h = hashlib.sha256(self.config_hash().encode())
        for name, value in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> str:
        """Write ``config.json`` and ``model.safetensors`` (weights only; usage buffers are not saved);
        returns the fingerprint written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        fingerprint = self.fingerprint()
        save_file(state, str(directory / WEIGHTS_NAME),
                  metadata={"config_hash": self.config_hash(), "fingerprint": fingerprint})
        logger.debug("wrote tokenizer to %s (%s)", directory, fingerprint)
        return fingerprint

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> "VQGAN":
        """Rebuild from ``config.json`` and load ``model.safetensors`` strictly; returns the model in eval mode."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        model = cls(config_from_json(config_path))
        try:
            state = load_file(str(weights_path))
        except SafetensorError as e:
            raise ValueError(f"{weights_path} is not a valid safetensors file: {e}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:   # torch lists every mismatch on its own line: name the first, count the rest
            problems = [line.strip() for line in str(e).splitlines()[1:]] or [str(e)]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"{weights_path} does not match the model described by {config_path}: "
                             f"{problems[0][:300]}{more}") from None
        with safe_open(str(weights_path), framework="pt") as f:
            model._stored_fingerprint = (f.metadata() or {}).get("fingerprint")
        return model.to(device).eval() if device is not None else model.eval()


def config_from_json(path: str | Path) -> VQGANConfig:
    """Strictly parse a saved VQGANConfig: unknown keys and impossible values raise ValueError."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys")
    valid = [f.name for f in dataclasses.fields(VQGANConfig)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{path}: unknown key '{unknown[0]}' for VQGANConfig; valid keys: {', '.join(valid)}")
    try:
        return VQGANConfig(**data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _check_images(images: torch.Tensor, resolution: int) -> None:
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B, 3, H, W) in [-1, 1], got "
                         f"{images.dtype if torch.is_tensor(images) else type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (resolution, resolution):
        raise ValueError(f"images must have shape (B, 3, {resolution}, {resolution}) for this tokenizer, "
                         f"got {tuple(images.shape)}")


def _check_ids(ids: torch.Tensor, side: int, codebook_size: int, what: str, check_range: bool = True) -> None:
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got "
                         f"{ids.dtype if torch.is_tensor(ids) else type(ids).__name__}")
    if ids.ndim != 3 or ids.shape[1:] != (side, side):
        raise ValueError(f"{what} must have shape (B, {side}, {side}), got {tuple(ids.shape)}")
    if check_range:
        _check_range(ids, codebook_size, what)


def _check_range(ids: torch.Tensor, codebook_size: int, what: str) -> None:
    if ids.numel():
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
        bad = lo if lo < 0 else hi
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"token id {bad} in {what} is out of range: the codebook has {codebook_size} codes "
                             f"(valid ids 0..{codebook_size - 1})")
