"""Next-scale prediction (VAR: Tian et al. 2024, "Visual Autoregressive Modeling"; seed lecture 004).

An image is a pyramid of K token maps r_1..r_K of side s_1 < ... < s_K = G, and
p(r_1..r_K | c) = prod_k p(r_k | r_<k, c): every token of scale k is predicted at once, from the
class start token and the coarser scales. The sequence holds L = sum_k s_k^2 tokens, scales
concatenated coarse -> fine, raster order within a scale.

Inputs: the s_1^2 positions of scale 1 get the class start token ([S] in the lecture, VAR's sos);
scale k >= 2 gets Linear(codec_dim -> D) of the tokenizer's feature for it, i.e. f_hat of scales
1..k-1 area-downsampled to s_k (the ``ScaleCodec`` protocol below: the only thing this module knows
about the tokenizer). Plus a learned embedding of the level k. Attention is block-causal: a token
sees its own scale and every coarser one.

Positions: 2D RoPE with each token's centre on the finest grid, ((i + 0.5) * G / s - 0.5), so all
scales share one coordinate frame and a coarse token sits over the fine tokens it summarises. VAR
uses learned absolute embeddings instead; we add none: RoPE gives relative geometry across scales,
and the 1x1 scale sits at the image centre, so every token also knows where it is on the image.

Letters: B batch, L all tokens, l tokens of one scale (or of scales 2..K), K scales, V codebook,
C codec feature channels, D width, s side of a scale, G finest side.
"""
from __future__ import annotations

import logging
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from generator.base import CompiledOrEager, Generator, LossOutput, eval_mode
from generator.config import GeneratorConfig
from generator.sampling import cfg_combine_doubled, cfg_scale_at, keep_known, sample_logits
from generator.transformer import BlockCausal, rope_tables

log = logging.getLogger(__name__)
# teacher forcing: a scale of at least this many tokens attends in its own SDPA call (flash / cuDNN tiles of
# 64-128 rows), the smaller ones before it in one call with the block-causal mask (transformer.BlockCausal).
# VAR-d16: 169 gives 3 calls per layer (the 91 + 64 + 100 tokens of the small scales masked, then 13x13 and
# 16x16), the compiled step's fastest of 5 / 3 / 1 calls (H200, batch 128: 52.2% MFU vs 51.7 and 51.2% with 5
# calls, 48.3% with one masked call: benchmarks/NOTES.md A55)
ALONE_TOKENS = 169


@runtime_checkable
class ScaleCodec(Protocol):
    """What VAR needs from a multi-scale tokenizer. Both methods use the same maths:
    f_hat += Phi_k(upsample(embed(ids_k))); the input of scale k+1 = area-downsample(f_hat, s_{k+1}),
    flattened in raster order. ``k`` is the 0-based index into ``scales`` (last scale: K - 1)."""

    scales: tuple[int, ...]
    codebook_dim: int       # C: channels of the features fed to VAR (= GeneratorConfig.codec_dim)

    def teacher_forcing_input(self, ids_list: list[torch.Tensor], check_range: bool = True) -> torch.Tensor:
        """ids of every scale [(B, s_k, s_k) long] -> inputs of scales 2..K, (B, sum_{k>=2} s_k^2, C).
        ``check_range`` False: the ids are trusted (made by this codec), so no host sync checks them."""
        ...

    def next_scale_input(self, f_hat_BChw: torch.Tensor | None, ids_k_Bss: torch.Tensor,
                         k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale k's ids to f_hat (None before the first scale); return (f_hat_BChw, input of
        scale k+1 (B, s_{k+1}^2, C), or None when k is the last scale)."""
        ...


def split_scales(ids_BL: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """(B, L) flattened pyramid -> [(B, s, s)] coarse -> fine."""
    if ids_BL.shape[-1] != sum(s * s for s in scales):
        raise ValueError(f"expected {sum(s * s for s in scales)} tokens for scales {list(scales)}, "
                         f"got {ids_BL.shape[-1]}")
    parts = ids_BL.split([s * s for s in scales], dim=-1)
    return [p.reshape(*p.shape[:-1], s, s) for p, s in zip(parts, scales)]


def join_scales(ids_list: list[torch.Tensor]) -> torch.Tensor:
    """[(B, s, s)] coarse -> fine -> (B, L) flattened pyramid (the token cache's layout)."""
    return torch.cat([ids.flatten(-2) for ids in ids_list], dim=-1)


def scale_positions(scales: tuple[int, ...]) -> torch.Tensor:
    """(L, 2) float (row, col) of each token's centre on the finest grid: (i + 0.5) * G / s - 0.5."""
    G = scales[-1]
    rows = []
    for s in scales:
        c = (torch.arange(s, dtype=torch.float64) + 0.5) * G / s - 0.5
        r, q = torch.meshgrid(c, c, indexing="ij")
        rows.append(torch.stack([r.reshape(-1), q.reshape(-1)], dim=1))
    return torch.cat(rows).float()


class _CodecRef:
    """Holds the codec outside the module tree: not a submodule, not in the state dict, not moved by
    ``.to()``, and shared (never copied) when the generator is deep-copied, e.g. for EMA."""

    def __init__(self, codec: ScaleCodec):
        self.codec = codec

    def __deepcopy__(self, memo):
        return self


class VARGenerator(Generator):
    kind = "var"

    def __init__(self, config: GeneratorConfig):
        super().__init__(config)
        scales = config.scales
        self.num_scales = len(scales)
        self.first_l = scales[0] ** 2
        self.bounds = [0]                                  # scale k occupies [bounds[k], bounds[k+1])
        for s in scales:
            self.bounds.append(self.bounds[-1] + s * s)
        self.word_embed = nn.Linear(config.codec_dim, config.dim)   # codec feature -> token input
        self.lvl_embed = nn.Embedding(self.num_scales, config.dim)  # which scale a token belongs to
        level_L = torch.cat([torch.full((s * s,), k) for k, s in enumerate(scales)])
        self.register_buffer("level_L", level_L, persistent=False)
        # block-causal: query q sees key j iff j's scale is not finer than q's
        self.register_buffer("mask_LL", level_L[None, :] <= level_L[:, None], persistent=False)
        cos_LF, sin_LF = rope_tables(scale_positions(scales), config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos_LF, persistent=False)
        self.register_buffer("rope_sin", sin_LF, persistent=False)
        self._codec_ref: _CodecRef | None = None
        self._init_weights()

    # ---- the codec ---------------------------------------------------------------------------
    def check_codec(self, codec) -> ScaleCodec:
        if not isinstance(codec, ScaleCodec):
            raise ValueError(f"{type(codec).__name__} is not a ScaleCodec (needs scales, codebook_dim, "
                             "teacher_forcing_input, next_scale_input): use a multi-scale tokenizer")
        if tuple(codec.scales) != self.config.scales:
            raise ValueError(f"the tokenizer's scales {list(codec.scales)} differ from the generator's "
                             f"{list(self.config.scales)}")
        if codec.codebook_dim != self.config.codec_dim:
            raise ValueError(f"the tokenizer's codebook_dim {codec.codebook_dim} differs from the "
                             f"generator's codec_dim {self.config.codec_dim}")
        return codec

    def set_codec(self, codec: ScaleCodec | None) -> None:
        """Keep a reference to the tokenizer so ``loss(ids, labels)`` can build its own inputs.
        Not a submodule: never saved, never moved with ``.to()``."""
        self._codec_ref = None if codec is None else _CodecRef(self.check_codec(codec))

    @property
    def codec(self) -> ScaleCodec | None:
        return None if self._codec_ref is None else self._codec_ref.codec

    def codec_inputs(self, ids_BL: torch.Tensor, codec: ScaleCodec | None = None,
                     check_range: bool = True) -> torch.Tensor:
        """Teacher-forcing inputs (B, L - s_1^2, C) from the (set) codec, without gradients;
        ``check_range`` goes to the codec (False: no host sync, for trusted token-cache ids)."""
        codec = codec if codec is not None else self.codec
        if codec is None:
            raise ValueError("VAR needs the tokenizer's teacher-forcing inputs: pass codec_inputs_BlC "
                             "(codec.teacher_forcing_input(ids_list)) or call set_codec(tokenizer) first")
        with torch.no_grad():
            return codec.teacher_forcing_input(split_scales(ids_BL, self.config.scales), check_range=check_range)

    # ---- network -----------------------------------------------------------------------------
    def teacher_forced_logits(self, labels_B: torch.Tensor, inputs_BlC: torch.Tensor) -> torch.Tensor:
        """One uncached forward over a prefix of scales: (B,) class ids (already checked) and the
        inputs of scales 2..k (B, l, C) -> logits (B, s_1^2 + l, V) of scales 1..k."""
        Lp = self.first_l + inputs_BlC.shape[1]
        if Lp not in self.bounds[1:]:
            raise ValueError(f"{inputs_BlC.shape[1]} input tokens do not end on a scale boundary of "
                             f"scales {list(self.config.scales)}")
        if inputs_BlC.shape[-1] != self.config.codec_dim:
            raise ValueError(f"codec inputs have {inputs_BlC.shape[-1]} channels, the model expects "
                             f"codec_dim {self.config.codec_dim}")
        cond_BD = self.class_emb(labels_B)
        start_BlD = cond_BD[:, None].expand(-1, self.first_l, -1)
        x_BLD = torch.cat([start_BlD, self.word_embed(inputs_BlC.to(self.word_embed.weight))], dim=1)
        x_BLD = x_BLD + self.lvl_embed(self.level_L[:Lp])
        mask = BlockCausal.from_bounds([b for b in self.bounds if b <= Lp], self.mask_LL, ALONE_TOKENS)
        h_BLD = self.backbone(x_BLD, self.rope_cos[:Lp], self.rope_sin[:Lp], cond_BD, mask_LS=mask)
        return self.head(h_BLD)

    def _ce_BL(self, ids_BL, labels_B, codec_inputs_BlC):
        """Per-token cross-entropy (B, L) and logits (B, L, V); ids_BL long of the right length."""
        if codec_inputs_BlC is None:    # ids from a token cache the codec made: no range check, no host sync
            codec_inputs_BlC = self.codec_inputs(ids_BL, check_range=False)
        expected = (ids_BL.shape[0], self.config.num_tokens - self.first_l, self.config.codec_dim)
        if tuple(codec_inputs_BlC.shape) != expected:
            raise ValueError(f"codec inputs must have shape {expected}, got {tuple(codec_inputs_BlC.shape)}")
        logits_BLV = self.teacher_forced_logits(labels_B, codec_inputs_BlC)
        ce_BL = F.cross_entropy(logits_BLV.float().flatten(0, 1), ids_BL.flatten(), reduction="none")
        return ce_BL.view_as(ids_BL), logits_BLV

    def loss(self, ids_BL: torch.Tensor, labels_B: torch.Tensor,
             codec_inputs_BlC: torch.Tensor | None = None) -> LossOutput:
        """Mean cross-entropy over all L tokens (teacher forcing, class dropout for CFG).
        ``codec_inputs_BlC`` = codec.teacher_forcing_input(split_scales(ids)); None -> the set codec."""
        ids_BL = self.token_batch(ids_BL).to(self.head.weight.device)   # values unchecked: no host sync per step
        self.check_label_count(labels_B, ids_BL.shape[0])
        labels_B = self.drop_classes(labels_B.to(self.head.weight.device).long())
        ce_BL, logits_BLV = self._ce_BL(ids_BL, labels_B, codec_inputs_BlC)
        loss = ce_BL.mean()
        with torch.no_grad():
            metrics = {"loss": loss.detach(),
                       "accuracy": (logits_BLV.argmax(-1) == ids_BL).float().mean()}
            per_scale = ce_BL.detach().mean(0).split([s * s for s in self.config.scales])
            for s, ce in zip(self.config.scales, per_scale):
                metrics[f"loss_{s}x{s}"] = ce.mean()
        return LossOutput(loss, metrics)

    @torch.no_grad()
    @eval_mode
    def nll_bits_per_token(self, ids_BL: torch.Tensor, labels_B=None, generator: torch.Generator | None = None,
                           codec_inputs_BlC: torch.Tensor | None = None) -> torch.Tensor:
        """Exact -log2 p(ids | class) / L per image, (B,) float. VAR's factorisation over scales is
        exact, so no sampling is involved (``generator`` is unused). Labels None -> unconditional."""
        ids_BL = self.checked_token_batch(ids_BL)
        labels_B = self.class_ids(labels_B, ids_BL.shape[0])
        ce_BL, _ = self._ce_BL(ids_BL, labels_B, codec_inputs_BlC)
        return ce_BL.mean(1) / math.log(2)

    # ---- sampling ----------------------------------------------------------------------------
    def _known(self, known_ids, known_mask, batch: int | None):
        """Validate the inpainting constraint: lists of (B, s, s) per scale (or flattened (B, L))."""
        if known_ids is None and known_mask is None:
            return None, None
        if known_ids is None or known_mask is None:
            raise ValueError("inpainting needs both known_ids and known_mask")
        device, scales = self.head.weight.device, self.config.scales
        if torch.is_tensor(known_ids):
            known_ids = split_scales(known_ids, scales)
        if torch.is_tensor(known_mask):
            known_mask = split_scales(known_mask, scales)
        if len(known_ids) != len(scales) or len(known_mask) != len(scales):
            raise ValueError(f"known_ids and known_mask need one (B, s, s) map per scale: {len(scales)} scales")
        batch = batch or known_ids[0].shape[0]
        out_ids, out_mask = [], []
        for s, ids, mask in zip(scales, known_ids, known_mask):
            if tuple(ids.shape) != (batch, s, s) or tuple(mask.shape) != (batch, s, s):
                raise ValueError(f"known_ids / known_mask of scale {s} must have shape {(batch, s, s)}, got "
                                 f"{tuple(ids.shape)} / {tuple(mask.shape)}")
            if mask.dtype != torch.bool:
                raise ValueError(f"known_mask must be bool, got {mask.dtype}")
            out_ids.append(self.check_ids(torch.where(mask, ids, 0)).to(device))   # unknown cells: any value
            out_mask.append(mask.to(device))
        return out_ids, out_mask

    def scale_logits(self, x_BlD: torch.Tensor, cos_lF: torch.Tensor, sin_lF: torch.Tensor, cond_BD: torch.Tensor,
                     cache_pos: int) -> torch.Tensor:
        """One scale of cached sampling: its inputs (B, l, D), written at cache slots [cache_pos, cache_pos + l)
        and attending to every filled slot (block-causal: all coarser scales and itself, no mask) -> logits
        (B, l, V) float32. The function ``sample(compile=True)`` compiles."""
        return self.head(self.backbone(x_BlD, cos_lF, sin_lF, cond_BD, cache_pos=cache_pos)).float()

    def _scale_fn(self, compile: bool):
        """``scale_logits``, or with ``compile`` its torch.compile'd version (dynamic shapes; on CUDA mode
        reduce-overhead: one CUDA graph replay per scale, its graph recorded at the first call of each
        scale size), kept on the module (``compiled_once``). The whole scale is one graph: at batch 1 the
        host, not the GPU, bounded the earlier compile of one function per block (16 compiled calls per
        scale: 133 ms of wall time around 22 ms of GPU work on an H200, NOTES A24). Dynamo specialises the
        1-token first scale, so two graphs. A compile failure falls back to eager for good with a warning
        (``CompiledOrEager``)."""
        if not compile:
            return self.scale_logits
        options = dict(dynamic=True, mode="reduce-overhead" if self.head.weight.device.type == "cuda" else None)
        return self.compiled_once(lambda: CompiledOrEager(self.scale_logits, self.scale_logits,
                                                          "VAR sampler's scale forward", log, "running it eagerly",
                                                          **options))

    @torch.no_grad()
    @eval_mode
    def sample(self, classes=None, *, codec: ScaleCodec | None = None, num_steps: int | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
               cfg_schedule: str = "linear", generator: torch.Generator | None = None,
               known_ids=None, known_mask=None, batch_size: int | None = None, compile: bool = False,
               **ignored) -> list[torch.Tensor]:
        """Generate a token pyramid, one forward per scale with a KV cache across scales.

        classes: class ids (B,) or None (unconditional; B from batch_size or known_ids).
        cfg_scale: guidance at the last scale; with cfg_schedule "linear" it ramps from 1 at the
        first scale (VAR). known_ids / known_mask: lists of (B, s, s) per scale (e.g. the tokenizer's
        encode_scales of an image) forced at every scale before the next scale's input is built.
        num_steps is ignored (one step per scale). ``compile``: each scale's forward runs through one
        torch.compile'd function (``_scale_fn``; CUDA graphs on a GPU); the first call compiles (VAR-d16:
        ~150 s on an H200), and compiled kernels may round differently from eager ones, so a few tokens can
        differ. The compiled path keeps its KV caches for the next call of the same batch (the CUDA graphs
        read them in place; ``backbone.remove_caches()`` frees them); eager sampling removes them.
        Returns [(B, s, s) long] coarse -> fine.
        """
        if ignored:
            log.debug("VAR sampler ignores %s", sorted(ignored))
        self.check_sampling_args(1, temperature, top_k, top_p, cfg_scale)
        cfg_scale_at(cfg_scale, 0.0, cfg_schedule)                  # unknown schedule -> ValueError now
        codec = codec if codec is not None else self.codec
        if codec is None:
            raise ValueError("VAR sampling needs the multi-scale tokenizer: pass codec=tokenizer or call set_codec")
        codec = self.check_codec(codec)
        if classes is None and batch_size is None and known_ids is not None:
            batch_size = known_ids[0].shape[0] if not torch.is_tensor(known_ids) else known_ids.shape[0]
        labels_B = self.class_ids(classes, batch_size)
        B, K, device = labels_B.shape[0], self.num_scales, labels_B.device
        known_ids, known_mask = self._known(known_ids, known_mask, B)
        guided = cfg_scale != 1.0                                   # s = 1: no unconditional pass at all
        if guided:
            labels_B = torch.cat([labels_B, torch.full_like(labels_B, self.config.null_class)])
        cond_BD = self.class_emb(labels_B)
        scale_logits = self._scale_fn(compile)
        # every slot a scale reads was written earlier in this call, so kept caches need no reset
        self.backbone.setup_caches(labels_B.shape[0], self.config.num_tokens, self.compute_dtype(), device,
                                   reuse=compile)
        try:
            ids_list, f_hat_BChw, next_BlC = [], None, None
            for k, s in enumerate(self.config.scales):
                a, b = self.bounds[k], self.bounds[k + 1]
                if k == 0:
                    x_BlD = cond_BD[:, None].expand(-1, self.first_l, -1)
                else:
                    x_BlD = self.word_embed(next_BlC.to(self.word_embed.weight))
                x_BlD = x_BlD + self.lvl_embed.weight[k]
                logits_BlV = scale_logits(x_BlD, self.rope_cos[a:b], self.rope_sin[a:b], cond_BD, a)
                if guided:
                    w = cfg_scale_at(cfg_scale, k / max(K - 1, 1), cfg_schedule)
                    logits_BlV = cfg_combine_doubled(logits_BlV, w)
                idx_Bl, _ = sample_logits(logits_BlV, temperature, top_k, top_p, generator)
                idx_Bss = idx_Bl.view(B, s, s)
                if known_ids is not None:
                    idx_Bss = keep_known(idx_Bss, known_ids[k], known_mask[k])
                ids_list.append(idx_Bss)
                f_hat_BChw, next_BlC = codec.next_scale_input(f_hat_BChw, idx_Bss, k)
                if guided and next_BlC is not None:
                    next_BlC = torch.cat([next_BlC, next_BlC])      # same input for the unconditional half
        finally:
            if not compile:
                self.backbone.remove_caches()
        return ids_list


def var_d16(**kw) -> VARGenerator:
    """VAR-d16 size: 310.5M parameters (303.2M in the 16 blocks, adaLN included; VAR's d16: 310M)."""
    return VARGenerator(GeneratorConfig(**{
        "kind": "var", "codebook_size": 4096, "grid_size": 16, "scales": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        "codec_dim": 32, "num_classes": 1000, "dim": 1024, "depth": 16, "heads": 16, "adaln": True, **kw}))


def var_d20(**kw) -> VARGenerator:
    """VAR-d20 size: 603.2M parameters (593.3M in the 20 blocks, adaLN included; VAR's d20: 600M)."""
    return var_d16(**{"dim": 1280, "depth": 20, "heads": 20, **kw})
