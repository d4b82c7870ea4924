"""Absorbing (masked) discrete diffusion over VQ token grids: MaskGIT / MDLM / aMUSEd.

Letters: B batch, L = h*w grid tokens (raster order), V codebook size (id V is [MASK]), D width,
J number of time (mask-count) strata.

The maths, from the seed lectures (002: absorbing diffusion / MDLM; 004: posterior and L_mask):
- forward marginal  q(x_t | x_0) = Cat(alpha_t x_0 + (1 - alpha_t) m)                 -> q_sample
- training loss     L_mask = E_t sum_l w_t 1{x_t^l = m} [-log p(x_0^l | x_t)]            -> loss
                    with w_t = 1 (MaskGIT) or -alpha'_t / (1 - alpha_t) (the NELBO weight)
- NELBO             E_q int_0^1 alpha'_t / (1 - alpha_t) sum_l log <x_theta^l(z_t), x^l> dt -> nll_bits_per_token
- posterior         q(x_s = x_0 | x_t = m, x_0) = (alpha_s - alpha_t) / (1 - alpha_t), s < t -> ancestral_step
- MaskGIT decoding  keep the most confident predictions (Chang et al. 2022)              -> confidence_step
                    = confidence_noise (eager draws) + confidence_update (pure, compilable)

The network sees [class] + x_t (2D RoPE over the grid, the class token carries no position), full
bidirectional attention, and no time input (MDLM: time conditioning is unnecessary for absorbing
diffusion, the masked fraction already tells it). It predicts x_0 at every grid position; the loss
and the samplers only use masked positions (a clean token is carried over, MDLM's SUBS).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from generator import fused_attention, fused_draw, fused_swiglu, matvec, philox_noise
from generator.base import CompiledOrEager, Generator, LossOutput, eval_mode
from generator.call_graphs import CallGraphs
from generator.config import GeneratorConfig
from generator.sampling import (CFG_SCHEDULES, cfg_combine_doubled, cfg_scale_at, cuda_generator, draw_with_noise,
                                exponential_noise, gumbel_noise, keep_known, sample_logits)
from generator.schedules import Schedule, alpha_at, as_time, get_schedule, loss_weight
from generator.transformer import rope_tables

logger = logging.getLogger(__name__)
SAMPLERS = ("confidence", "ancestral")
# The first step of guided sampling without known tokens: every sequence is all [MASK], so the B unconditional
# sequences are one and the same; the forward runs it once (B + 1 sequences instead of 2B, about half of that
# step's work) and guidance broadcasts its logits over the batch. The same values as B copies (each row of a
# forward is computed alone), up to a GPU kernel's rounding at another batch size (NOTES A37). False: 2B rows.
SHARE_FIRST_UNCOND = True
# sample(compile=True) on CUDA records each call whole as one CUDA graph (its second call of a kind; NOTES A39),
# the forward compiled without graphs of its own; False: the forward's own graphs (reduce-overhead), the rest
# of each step launched kernel by kernel.
CALL_GRAPHS = os.environ.get("TESSERA_CALL_GRAPHS", "1") != "0"


def kernel_switches() -> tuple:
    """The module-level kernel choices a recorded call bakes in (a change records another graph)."""
    return (fused_draw.ENABLED, fused_draw.FRESH_NOISE, fused_attention.ENABLED, fused_attention.METHOD,
            fused_swiglu.ENABLED, matvec.ENABLED)


def unconditional_sequences(batch: int, step: int, guided: bool, inpainting: bool = False) -> int:
    """How many unconditional sequences step ``step`` of guided sampling runs beside the B conditional ones: B,
    but 1 at the first step when the B start as one all-[MASK] sequence (``SHARE_FIRST_UNCOND``, no known tokens,
    B > 1); 0 without guidance. ``sample`` follows it, and the roofline counts its FLOPs with it."""
    if not guided:
        return 0
    return 1 if step == 0 and SHARE_FIRST_UNCOND and not inpainting and batch > 1 else batch


# ---- samplers: outside the network, scheduler-like (STYLE rule 5) -------------------------------
def unmask_probability(schedule: Schedule, t: float, s: float) -> float:
    """Posterior q(x_s = x_0 | x_t = m, x_0) = (alpha_s - alpha_t) / (1 - alpha_t) for s < t
    (seed 002 "q_t(x_{t-1} = x_0 | x_t = m, x_0)"; seed 004 with alpha_bar). Exactly 1 at s = 0."""
    a_t, a_s = alpha_at(schedule, t), alpha_at(schedule, s)
    if a_s >= 1.0:
        return 1.0
    return min(max((a_s - a_t) / max(1.0 - a_t, 1e-12), 0.0), 1.0)


def scheduled_masked_fraction(schedule: Schedule, s: float) -> float:
    """(1 - alpha(s)) / (1 - alpha(1)): the fraction of the start's masked tokens still masked at
    time s (MaskGIT's gamma(1 - s), normalised to 1 at s = 1 and 0 at s = 0). A host-side float."""
    return (1.0 - alpha_at(schedule, s)) / (1.0 - alpha_at(schedule, 1.0))


def scheduled_masked_count(num_masked_start_B: torch.Tensor, schedule: Schedule, s: float) -> torch.Tensor:
    """Tokens the confidence sampler leaves masked at time s: round(N0 (1 - alpha(s)) / (1 - alpha(1))).

    N0 (B,) long is the number masked at the start (t = 1); 1 - alpha(s) is MaskGIT's gamma(1 - s).
    The normalisation by 1 - alpha(1) (= 1 except loglinear) makes the count N0 at s = 1; it is 0 at s = 0.
    The fraction is a host float, so this launches one device op and never syncs.
    """
    return torch.round(num_masked_start_B.double() * scheduled_masked_fraction(schedule, s)).long()


def ancestral_step(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, t: float, s: float, schedule: Schedule,
                   mask_id: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One reverse step t -> s of p(x_s | x_t) (seed 002): a masked token unmasks with probability
    (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from p(x_0 | x_t); clean tokens stay."""
    masked_BL = ids_BL == mask_id
    cand_BL, _ = sample_logits(logits_BLV, temperature, top_k, top_p, generator)
    u_BL = torch.rand(ids_BL.shape, generator=generator, device=ids_BL.device)
    unmask_BL = masked_BL & (u_BL < unmask_probability(schedule, t, s))
    return torch.where(unmask_BL, cand_BL, ids_BL)


def confidence_noise(shape_BLV: tuple[int, int, int], s: float, device, *, temperature: float = 1.0,
                     choice_temperature: float = 4.5, generator: torch.Generator | None = None,
                     noise_stream: philox_noise.NoiseStream | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The random draws of one MaskGIT step ending at time s, from ``generator`` in the order the
    step has always drawn them (same seed, same ids):

    1. E (B, L, V) float32 ~ Exp(1) for the candidates argmax(p / E) (``sample_logits``); None when
       temperature = 0 (greedy: nothing drawn).
    2. choice_temperature * s * G, G (B, L) ~ Gumbel(0, 1): the annealed confidence noise; None when
       choice_temperature * s = 0 (the last step, s = 0).

    With ``noise_stream`` (``confidence_step``'s) the same numbers come from the state it holds: E is made inside
    the draw, which took it from the stream before this call (``fused_draw.noise_draw``; None here), and G is
    -log of ``philox_noise.exponential``'s Exp(1), as ``gumbel_noise`` takes it of ``exponential_``'s.
    """
    B, L, _ = shape_BLV
    exp_BLV = exponential_noise(shape_BLV, generator, device) if temperature > 0 and noise_stream is None else None
    choice_BL = None
    if choice_temperature * s > 0:
        gumbel_BL = (gumbel_noise((B, L), generator, device) if noise_stream is None
                     else -philox_noise.exponential((B, L), noise_stream).log())
        choice_BL = choice_temperature * s * gumbel_BL
    return exp_BLV, choice_BL


def confidence_noise_increment(shape_BLV: tuple[int, int, int], num_steps: int, choice_temperature: float,
                               device: torch.device) -> int:
    """How far a confidence sampling call's draws (``confidence_noise`` at each step, temperature > 0) move a CUDA
    generator's Philox offset: the (B, L, V) Exp(1) noise every step, the (B, L) Gumbel noise where
    choice_temperature * s > 0. What a call that makes its noise in the draw (``philox_noise``) moves it by."""
    B, L, V = shape_BLV
    noise = philox_noise.device_layout(B * L * V, device).increment
    choice = philox_noise.device_layout(B * L, device).increment
    return sum(noise + (choice if choice_temperature * s > 0 else 0) for _, s in time_grid(num_steps))


def confidence_update(logits_BMV: torch.Tensor, ids_BL: torch.Tensor, remain_B: torch.Tensor,
                      exp_noise_BLV: torch.Tensor | None, choice_noise_BL: torch.Tensor | None, *,
                      mask_id: int, cfg_scale: float | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, positions_BM: torch.Tensor | None = None,
                      drawn_BM: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The MaskGIT confidence step as a pure tensor function (no generator, no host sync: traceable
    by ``torch.compile(fullgraph=True)``); its noise comes from ``confidence_noise``.

    - guidance: with ``cfg_scale``, logits are the doubled [cond; uncond] (2B, L, V), or (B + 1, L, V) with
      one unconditional sequence shared by every row (the first step, ``SHARE_FIRST_UNCOND``), and
      logits = uncond + cfg_scale (cond - uncond) (``cfg_combine``), fused here.
    - candidates: c = argmax(p / E) with p = softmax(top-k/top-p(logits / temperature)) (the
      Gumbel-max draw of ``sample_logits``), or argmax(logits) at temperature 0 (E is None). On CUDA
      without top-k / top-p, guidance, the draw and the confidence below are one Triton pass over the
      logits (``fused_draw``: equal up to float32 rounding).
    - confidence: log softmax(logits)[c] + choice_noise (the annealed Gumbel term, or None), on the
      guided but unfiltered probabilities, so greedy decoding still ranks by confidence.
    - unmask: the least confident R = max(min(remain_B, M - 1), 0) masked tokens stay masked
      (M = masked now: at least one unmasks while any remain), every other masked token takes c.

    remain_B (B,) long is the scheduled count (``scheduled_masked_count``). Returns ids (B, L) long.

    positions_BM (B, M) long: the grid positions the logits are for, when the head ran only there
    (``masked_positions``: every masked token among them, in increasing order). The noise (drawn for
    all L positions) is read there, clean tokens among them rank last as above, and the ranking
    over the M positions is the one over all L restricted to them (stable sort, same order): the ids
    are those of the full-grid update on the same logits.

    drawn_BM: (candidates, log p(candidate)) (B, M) drawn already (``fused_draw.noise_draw``); the logits and
    exp_noise_BLV are then not read.
    """
    ids_BM = ids_BL if positions_BM is None else ids_BL.gather(1, positions_BM)
    if drawn_BM is not None:
        cand_BM, conf_BM = drawn_BM
    elif fused_draw.use_kernel(logits_BMV, exp_noise_BLV, temperature, top_k, top_p):   # one pass (NOTES A32)
        cand_BM, conf_BM = fused_draw.confidence_draw(logits_BMV, exp_noise_BLV, positions_BM, cfg_scale, temperature)
    else:
        logits_BMV = logits_BMV.float()                # guided in float32, as a compiled update computes it
        if cfg_scale is not None:
            logits_BMV = cfg_combine_doubled(logits_BMV, cfg_scale, ids_BL.shape[0])
        if positions_BM is not None and exp_noise_BLV is not None:
            exp_noise_BLV = exp_noise_BLV.gather(1, positions_BM[..., None].expand(-1, -1, exp_noise_BLV.shape[-1]))
        cand_BM, _ = draw_with_noise(logits_BMV, exp_noise_BLV, temperature, top_k, top_p)   # None: greedy
        conf_BM = logits_BMV.gather(-1, cand_BM[..., None]).squeeze(-1) - logits_BMV.logsumexp(-1)
    if positions_BM is not None and choice_noise_BL is not None:
        choice_noise_BL = choice_noise_BL.gather(1, positions_BM)
    masked_BM = ids_BM == mask_id
    if choice_noise_BL is not None:
        conf_BM = conf_BM + choice_noise_BL
    conf_BM = conf_BM.masked_fill(~masked_BM, float("inf"))        # clean tokens rank last: never "kept masked"
    remain_B = torch.minimum(remain_B, masked_BM.sum(1) - 1)
    rank_BM = stable_rank(conf_BM)                                 # 0 = least confident
    stay_BM = rank_BM < remain_B.clamp(min=0)[:, None]
    new_BM = torch.where(masked_BM & ~stay_BM, cand_BM, ids_BM)
    return new_BM if positions_BM is None else ids_BL.scatter(1, positions_BM, new_BM)


def stable_rank(x_BM: torch.Tensor) -> torch.Tensor:
    """(B, M) long: each entry's place in its row sorted ascending, ties in index order, i.e.
    ``x.argsort(1, stable=True).argsort(1)``, counted as #{j: x_j < x_i} + #{j < i: x_j = x_i}. Compiled, the
    (B, M, M) comparisons are one reduction kernel, where the two sorts were two ~25 us launches per step at
    (64, 256) on an H100 (NOTES A40). Rows hold no NaN (confidences of finite logits, or +inf)."""
    i_M = torch.arange(x_BM.shape[1], device=x_BM.device)
    earlier_MM = i_M[None, :] < i_M[:, None]                       # [i, j]: j < i
    x_i, x_j = x_BM[:, :, None], x_BM[:, None, :]
    return ((x_j < x_i) | ((x_j == x_i) & earlier_MM)).sum(-1)


def masked_positions(ids_BL: torch.Tensor, mask_id: int, count: int) -> torch.Tensor:
    """(B, count) long: each row's masked positions in increasing order, then its clean ones (when a row
    has fewer than ``count`` masked). ``count`` >= every row's masked count (``masked_counts``)."""
    return (ids_BL != mask_id).to(torch.uint8).argsort(dim=1, stable=True)[:, :count].contiguous()


def time_grid(num_steps: int) -> list[tuple[float, float]]:
    """(t, s) pairs of the reverse process on a uniform grid from t = 1 to s = 0."""
    return [(1.0 - i / num_steps, 1.0 - (i + 1) / num_steps) for i in range(num_steps)]


def masked_counts(num_masked_start: int, schedule: Schedule, num_steps: int) -> list[int]:
    """How many tokens are masked at the start of each confidence step, on the host: M_0 = N0 and
    M_{i+1} = max(min(scheduled_masked_count(s_i), M_i - 1), 0), the count ``confidence_update`` leaves
    (the same round-half-even of the same double). Monotone in N0, so the largest start count of a
    batch bounds every row's count at every step."""
    counts, m = [], num_masked_start
    for _, s in time_grid(num_steps):
        counts.append(m)
        m = max(min(round(num_masked_start * scheduled_masked_fraction(schedule, s)), m - 1), 0)
    return counts


def confidence_step(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, s: float, schedule: Schedule, mask_id: int,
                    num_masked_start_B: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, choice_temperature: float = 4.5,
                    generator: torch.Generator | None = None, cfg_scale: float | None = None,
                    update=confidence_update, positions_BM: torch.Tensor | None = None,
                    noise_stream: philox_noise.NoiseStream | None = None) -> torch.Tensor:
    """One MaskGIT step ending at time s: draw a candidate for every masked token, score it by
    log p(candidate) + choice_temperature * s * Gumbel (noise annealed to 0 as progress 1 - s -> 1),
    and unmask the most confident so that exactly R = min(scheduled_masked_count(s), M - 1) tokens
    stay masked (M = masked now: at least one unmasks while any remain; R = 0 at s = 0).

    Eager part: the noise (``confidence_noise``) and the scheduled count; then ``update`` (default
    ``confidence_update``; ``MaskedGenerator.sample(compile=True)`` passes its compiled one). With
    ``cfg_scale``, logits are the doubled [cond; uncond] batch. Static shapes, no host sync.
    ``positions_BM``: the logits are for these positions only (``confidence_update``).

    ``noise_stream`` (CUDA, where ``fused_draw.use_noise_kernel`` holds): the same draws made from the generator
    state it holds instead of ``generator``: the candidates' noise inside the draw kernel (``fused_draw.noise_draw``,
    never stored), the Gumbel noise by ``philox_noise.exponential``; the same numbers (NOTES A46).
    """
    B, L = ids_BL.shape
    drawn_BM = None
    if noise_stream is not None:      # first: E is drawn before G, as exponential_ draws them
        drawn_BM = fused_draw.noise_draw(logits_BLV, positions_BM, noise_stream, B, L, cfg_scale, temperature)
        # (B, M) inputs of a compiled update, M dynamic as the positions' (without, torch 2.11 compiled one graph
        # per step's M until dynamo's recompile limit sent the update back to eager for good: session 24's batch 1)
        drawn_BM = tuple(dynamic_dim(t, positions_BM is not None) for t in drawn_BM)
    exp_BLV, choice_BL = confidence_noise((B, L, logits_BLV.shape[-1]), s, logits_BLV.device, temperature=temperature,
                                          choice_temperature=choice_temperature, generator=generator,
                                          noise_stream=noise_stream)
    remain_B = scheduled_masked_count(num_masked_start_B, schedule, s)
    return update(logits_BLV, ids_BL, remain_B, exp_BLV, choice_BL, mask_id=mask_id, cfg_scale=cfg_scale,
                  temperature=temperature, top_k=top_k, top_p=top_p, positions_BM=positions_BM, drawn_BM=drawn_BM)


@dataclass
class MaskedSampler:
    """The reverse process as a scheduler: ``timesteps()`` gives (t, s) pairs on a uniform grid from
    t = 1 to s = 0 (num_steps, independent of grid size); ``step`` maps ids at t to ids at s and
    applies the inpainting rule (a known token never changes)."""
    schedule: Schedule
    mask_id: int
    num_steps: int = 16
    method: str = "confidence"          # confidence (MaskGIT) | ancestral (MDLM / seed 002 posterior)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    choice_temperature: float = 4.5     # confidence: scale of the annealed Gumbel noise (MaskGIT: 4.5)

    def __post_init__(self):
        if self.method not in SAMPLERS:
            raise ValueError(f"sampler '{self.method}' is not one of {list(SAMPLERS)}")

    def timesteps(self) -> list[tuple[float, float]]:
        return time_grid(self.num_steps)

    def step(self, logits_BLV, ids_BL, t: float, s: float, generator=None, *, num_masked_start_B=None,
             known_ids_BL=None, known_mask_BL=None, cfg_scale: float | None = None,
             update=confidence_update, positions_BM=None, noise_stream=None) -> torch.Tensor:
        """logits (B, L, V) of p(x_0 | x_t) (guided already), ids (B, L) at t -> ids (B, L) at s.
        num_masked_start_B (B,) long: tokens masked at t = 1 (confidence; may be omitted at t = 1).
        With ``cfg_scale``, logits are the doubled [cond; uncond] (2B, L, V) (or (B + 1, L, V), one
        unconditional sequence for all: ``SHARE_FIRST_UNCOND``), combined here (the
        confidence sampler fuses that into ``update``, a ``confidence_update`` or a compiled one).
        positions_BM (B, M) long (confidence only): the logits are (B, M, V) for these grid positions,
        which hold every masked token (``masked_positions``). noise_stream: see ``confidence_step``."""
        opts = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=generator)
        if self.method == "ancestral":
            if positions_BM is not None or noise_stream is not None:
                raise ValueError("the ancestral sampler takes logits for every position and draws from the generator"
                                 " (no positions_BM, no noise_stream)")
            if cfg_scale is not None:
                logits_BLV = cfg_combine_doubled(logits_BLV, cfg_scale, ids_BL.shape[0])
            ids_BL = ancestral_step(logits_BLV, ids_BL, t, s, self.schedule, self.mask_id, **opts)
        else:
            if num_masked_start_B is None:
                if t < 1.0:
                    raise ValueError("the confidence sampler needs num_masked_start_B after its first step")
                num_masked_start_B = (ids_BL == self.mask_id).sum(1)
            ids_BL = confidence_step(logits_BLV, ids_BL, s, self.schedule, self.mask_id, num_masked_start_B,
                                     choice_temperature=self.choice_temperature, cfg_scale=cfg_scale, update=update,
                                     positions_BM=positions_BM, noise_stream=noise_stream, **opts)
        return keep_known(ids_BL, known_ids_BL, known_mask_BL)


def dynamic_dim(x: torch.Tensor, compile: bool) -> torch.Tensor:
    """Mark dim 1 (M, the positions the head runs at) dynamic for torch.compile: one graph serves every
    step's count instead of a recompile per count (dynamo's recompile limit is 8)."""
    if compile:
        torch._dynamo.maybe_mark_dynamic(x, 1)
    return x


# ---- the model ----------------------------------------------------------------------------------
class MaskedGenerator(Generator):
    kind = "masked"
    # torch.compile keyword arguments of the sampler's forward; without CALL_GRAPHS on CUDA it also records CUDA
    # graphs of its own (mode reduce-overhead). Inductor inlines a pointwise result into each kernel that reads it
    # until it reads more than ``realize_reads_threshold`` buffers (4 by default), so the fp32 residual stream
    # x + a + m + a' + ... was written once every second block and each norm re-read the blocks' outputs back to
    # it; at 2 it is written once per block and the norm in the middle reads only x and a: the same float32 sums in
    # the same order, ~8% fewer bytes through the norm kernels (NOTES A43). Benchmarks swap these options
    # (``sample-masked-max-autotune``, ``sample-masked-inductor-default``)
    forward_compile_options: dict = {"options": {"realize_reads_threshold": 2}}

    def __init__(self, config: GeneratorConfig):
        super().__init__(config)
        self.mask_id = config.codebook_size
        self.schedule = get_schedule(config.schedule)
        self.tok_emb = nn.Embedding(config.codebook_size + 1, config.dim)   # last row: [MASK]
        cos, sin = rope_tables(self.grid_positions(), config.head_dim, config.rope_base, num_prefix=1)
        self.register_buffer("rope_cos", cos, persistent=False)             # (1 + L, K/2); row 0: class token
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def forward(self, ids_BL: torch.Tensor, classes_B: torch.Tensor,
                positions_BM: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) of p(x_0 | x_t) at every grid position, or (B, M, V) at ``positions_BM``
        (B, M) long only (the sampler's masked positions: the head is ~1/8 of the FLOPs at the B size, and the
        last block's projection, MLP and norms run only there too).
        ids may hold [MASK] (= V)."""
        cls_BD = self.class_emb(classes_B)
        x_BLD = torch.cat([cls_BD[:, None], self.tok_emb(ids_BL)], dim=1)     # (B, 1 + L, D)
        cond_BD = cls_BD if self.config.adaln else None
        if positions_BM is None:
            return self.head(self.backbone(x_BLD, self.rope_cos, self.rope_sin, cond_BD)[:, 1:])   # full attention
        # only the rows at positions_BM (+1: the class token leads): the last block's MLP and the head run there
        return self.head(self.backbone(x_BLD, self.rope_cos, self.rope_sin, cond_BD, rows_BM=positions_BM + 1))

    def logits(self, ids_BL: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
        """Same as ``self(ids_BL, classes_B)`` (goes through a compiled forward after ``compile()``)."""
        return self(ids_BL, classes_B)

    def q_sample(self, ids_BL: torch.Tensor, t_B, generator: torch.Generator | None = None):
        """Forward marginal q(x_t | x_0) = Cat(alpha_t x_0 + (1 - alpha_t) m) (seed 002): each token
        independently stays with probability alpha(t), else becomes [MASK].

        t_B: (B,) float or a scalar. Returns (x_t_BL long, masked_BL bool)."""
        t_B = torch.as_tensor(t_B, dtype=torch.float32, device=ids_BL.device).expand(ids_BL.shape[0])
        alpha_B = self.schedule.alpha(t_B)
        u_BL = torch.rand(ids_BL.shape, generator=generator, device=ids_BL.device)
        masked_BL = u_BL >= alpha_B[:, None]                                 # P = 1 - alpha(t)
        return ids_BL.masked_fill(masked_BL, self.mask_id), masked_BL

    def loss(self, ids_BL: torch.Tensor, labels_B: torch.Tensor,
             generator: torch.Generator | None = None) -> LossOutput:
        """L_mask (seed 004) with w(t) from config.loss_weighting; ids (B, L) long, labels (B,) long.

        t is low-discrepancy across the batch (MDLM): t_i = (u + i) / B, u ~ U(0, 1), one t per
        stratum [i/B, (i+1)/B), which cuts the variance of the time integral; then clamped to T_MIN.
        - "elbo":    sum over masked positions of w(t) CE, / L, mean over the batch: the continuous
                     NELBO per token in nats (seed 002), an unbiased estimate of nll_bits_per_token * ln 2.
        - "maskgit": mean CE over all masked tokens of the batch (w = 1).
        """
        ids_BL = self.token_batch(ids_BL)
        B, L = ids_BL.shape
        self.check_label_count(labels_B, B)
        dev = ids_BL.device
        u = torch.rand((), generator=generator, device=dev)
        t_B = as_time((u + torch.arange(B, device=dev)) / B)
        x_t_BL, masked_BL = self.q_sample(ids_BL, t_B, generator)
        logits_BLV = self(x_t_BL, self.drop_classes(labels_B.to(dev).long(), generator))
        ce_BL = F.cross_entropy(logits_BLV.reshape(B * L, -1), ids_BL.reshape(-1), reduction="none").view(B, L)
        masked_f = masked_BL.float()
        n_masked = masked_f.sum().clamp(min=1.0)
        masked_ce = (ce_BL * masked_f).sum() / n_masked
        if self.config.loss_weighting == "elbo":
            w_B = loss_weight(t_B, self.schedule, "elbo")
            loss = (w_B * (ce_BL * masked_f).sum(1)).mean() / L
        else:
            loss = masked_ce
        correct = ((logits_BLV.detach().argmax(-1) == ids_BL) & masked_BL).sum()
        metrics = {"loss": loss.detach(), "masked_ce": masked_ce.detach(), "mask_ratio": masked_f.mean(),
                   "masked_acc": correct / n_masked}
        return LossOutput(loss, metrics)

    @torch.no_grad()
    @eval_mode
    def nll_bits_per_token(self, ids_BL: torch.Tensor, labels_B=None, generator: torch.Generator | None = None,
                           num_t: int = 16) -> torch.Tensor:
        """The continuous-time NELBO (seed 002) in bits per token, (B,) float: the likelihood bound
        comparable with AR's NLL. Always the ELBO weight, whatever the training weighting.

        NELBO / L = E_t[-alpha'(t)/(1 - alpha(t)) sum_{masked} -log p(x_0|x_t)] / L. Substituting the
        mask probability m = 1 - alpha(t) gives int_0^1 (1/m) E_m[...] dm, the same for every schedule
        (the network sees no t). Conditioning on the number K ~ Bin(L, m) of masked tokens,
        int_0^1 (1/m) C(L,k) m^k (1-m)^(L-k) dm = 1/k, so (MD4 / Ou et al. 2024, "RADD")
            NELBO / L = E_{k ~ U{1..L}} E_{S, |S| = k} [ (1/k) sum_{l in S} -log p(x_0^l | x_0 with S masked) ].
        We estimate this with num_t stratified mask counts k_j = 1 + floor(L (j + u) / num_t), u ~ U(0, 1)
        (unbiased; the same strata for every image) and one random subset per k_j: deterministic under
        ``generator``, and exact (log2 V) for a model that predicts uniformly.
        """
        if num_t < 1:
            raise ValueError(f"num_t must be >= 1, got {num_t}")
        ids_BL = self.checked_token_batch(ids_BL)
        B, L = ids_BL.shape
        dev = self.head.weight.device
        classes_B = self.class_ids(labels_B, B, dev)
        u = torch.rand((), generator=generator, device=dev)
        k_J = (1 + ((torch.arange(num_t, device=dev) + u) * L / num_t).floor().long()).clamp(max=L)
        total_B = torch.zeros(B, device=dev)
        for j in range(num_t):
            rank_BL = torch.rand((B, L), generator=generator, device=dev).argsort(1).argsort(1)
            masked_BL = rank_BL < k_J[j]                                     # a uniform subset of size k_j
            logits_BLV = self(ids_BL.masked_fill(masked_BL, self.mask_id), classes_B).float()
            ce_BL = F.cross_entropy(logits_BLV.reshape(B * L, -1), ids_BL.reshape(-1), reduction="none").view(B, L)
            total_B += (ce_BL * masked_BL).sum(1) / k_J[j]
        return total_B / num_t / math.log(2)

    def _known(self, known_ids, known_mask, B: int, dev):
        if known_ids is None and known_mask is None:
            return None, None
        if known_ids is None or known_mask is None:
            raise ValueError("inpainting needs both known_ids and known_mask (or neither)")
        g = self.config.grid_size
        if tuple(known_ids.shape) != (B, g, g) or tuple(known_mask.shape) != (B, g, g):
            raise ValueError(f"known_ids {tuple(known_ids.shape)} and known_mask {tuple(known_mask.shape)} "
                             f"must both have shape (B, h, w) = {(B, g, g)}")
        if known_mask.dtype != torch.bool:
            raise ValueError(f"known_mask must be a bool tensor (True = known), got dtype {known_mask.dtype}")
        known_mask = known_mask.to(dev).reshape(B, g * g)
        known_ids = self.check_ids(torch.where(known_mask, known_ids.to(dev).reshape(B, g * g), 0))
        return known_ids, known_mask

    def _sampling_fns(self, compile: bool) -> tuple:
        """(forward, confidence update, first step's forward, first step's update, call graphs) that ``sample``
        calls: the eager module and ``confidence_update``, or their torch.compile'd versions, kept on the module
        (``compiled_once``; a failure falls back to eager with a warning), and the ``CallGraphs`` that record
        whole calls on CUDA (``CALL_GRAPHS``). The forward compiles with ``forward_compile_options`` (inductor
        options, no mode: a call graph holds its kernels), plus reduce-overhead's CUDA graphs of its own on CUDA
        without ``CALL_GRAPHS``; the update with fullgraph=True (default mode). The update traces one graph per set
        of static options (greedy or not, top-k, top-p, guided or not) and one for the last step (no Gumbel
        term); past dynamo's recompile limit it falls back to eager. The first guided step (B + 1 sequences,
        ``SHARE_FIRST_UNCOND``) calls functions of its own (other code objects, so graphs of their own): sharing
        the others' would recompile them with a symbolic batch after their first call at another size."""
        if not compile:
            return self, confidence_update, self, confidence_update, None
        forward_options = dict(self.forward_compile_options)
        if self.head.weight.device.type == "cuda" and not CALL_GRAPHS:        # mode reduce-overhead's option
            forward_options["options"] = {**forward_options.get("options", {}), "triton.cudagraphs": True}

        def first_forward(*args):
            return self.forward(*args)

        def first_update(*args, **kw):
            return confidence_update(*args, **kw)

        return self.compiled_once(lambda: (
            CompiledOrEager(self.forward, self, "masked sampler's forward", logger, **forward_options),
            CompiledOrEager(confidence_update, confidence_update, "masked sampler's confidence update", logger,
                            fullgraph=True),
            CompiledOrEager(first_forward, self, "masked sampler's first-step forward", logger, **forward_options),
            CompiledOrEager(first_update, confidence_update, "masked sampler's first-step update", logger,
                            fullgraph=True),
            CallGraphs("masked sampling call", logger)),
            variant=(CALL_GRAPHS, repr(sorted(self.forward_compile_options.items()))))

    @torch.no_grad()
    @eval_mode
    def sample(self, classes, *, num_steps: int = 16, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               cfg_scale: float = 1.0, cfg_schedule: str = "constant", sampler: str = "confidence",
               choice_temperature: float = 4.5, generator: torch.Generator | None = None,
               known_ids: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               batch_size: int | None = None, compile: bool = False, **ignored) -> torch.Tensor:
        """Class ids (B,) (None: unconditional, batch from ``batch_size`` or ``known_ids``) -> ids
        (B, h, w) long with no [MASK] left, in ``num_steps`` forwards (doubled batch under CFG).

        known_ids / known_mask (B, h, w) long / bool: inpainting; known tokens start unmasked and
        never change. cfg_scale 1 runs the conditional pass only; cfg_schedule "linear" ramps the
        scale from 1 at the first step to cfg_scale at the last. Runs in eval mode (``eval_mode``).

        ``compile``: run the forward through torch.compile and the confidence update (CFG combine,
        candidate draw, confidence ranking: ``confidence_update``) through torch.compile(fullgraph=True);
        the noise is still drawn from ``generator`` in the same order, so the compiled path consumes the
        same random numbers. Both are built once per module and fall back to eager with a warning if
        compiling fails. The ancestral sampler's update stays eager (only its forward is compiled). On
        CUDA the whole call is recorded as one CUDA graph from its second call with the same shapes and
        options (``CALL_GRAPHS``, ``generator.call_graphs``: the same ids, the generator left where an
        unrecorded call leaves it); without it the forward runs its own graphs (reduce-overhead).
        Compiled kernels may round differently from eager ones, so a compiled run can pick a few
        different late tokens. On CUDA the confidence sampler's draw makes its noise itself, the numbers the
        generator would have drawn, and moves the generator on as those draws would (NOTES A46)."""
        self.check_sampling_args(num_steps, temperature, top_k, top_p, cfg_scale)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler '{sampler}' is not one of {list(SAMPLERS)}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg schedule '{cfg_schedule}' is not one of {list(CFG_SCHEDULES)}")
        if choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
        if ignored:
            logger.debug("masked sampler ignores %s", sorted(ignored))
        dev = self.head.weight.device
        if classes is None and batch_size is None:
            batch_size = known_ids.shape[0] if known_ids is not None else 1
        classes_B = self.class_ids(classes, batch_size, dev)
        known_ids_BL, known_mask_BL = self._known(known_ids, known_mask, B=classes_B.shape[0], dev=dev)
        # confidence: the head runs at the (at most) M_i positions masked at step i, a host count, so no
        # sync per step (one, for inpainting's largest start count)
        start = None
        if sampler == "confidence":
            start = self.config.num_tokens if known_mask_BL is None else int((~known_mask_BL).sum(1).max())
        steps = MaskedSampler(self.schedule, self.mask_id, num_steps, sampler, temperature, top_k, top_p,
                              choice_temperature)
        options = dict(steps=steps, start=start, guided=cfg_scale != 1.0 and classes is not None,
                       cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, compile=compile)
        # the draw's noise made in its kernel from the generator's state, on the device (a recorded call reads the
        # state of each replay); the generator then moves on by what the draws took (NOTES A46)
        noise_state, shape_BLV = None, (classes_B.shape[0], self.config.num_tokens, self.config.codebook_size)
        if sampler == "confidence" and fused_draw.use_noise_kernel(*shape_BLV, dev, generator, temperature, top_k,
                                                                   top_p):
            generator = cuda_generator(generator, dev)
            noise_state = philox_noise.state_of(generator, dev)
        inputs = (classes_B, known_ids_BL, known_mask_BL, noise_state)
        if compile and CALL_GRAPHS and dev.type == "cuda":
            key = (num_steps, sampler, temperature, top_k, top_p, choice_temperature, start, options["guided"],
                   cfg_scale, cfg_schedule, SHARE_FIRST_UNCOND, kernel_switches())
            call_graphs = self._sampling_fns(compile=True)[4]
            ids = call_graphs(functools.partial(self._denoise, **options), key, self, inputs, generator, dev)
        else:
            ids = self._denoise(*inputs, generator, **options)
        if noise_state is not None:
            philox_noise.advance(generator, confidence_noise_increment(shape_BLV, num_steps, choice_temperature, dev))
        return ids

    def _denoise(self, classes_B: torch.Tensor, known_ids_BL: torch.Tensor | None, known_mask_BL: torch.Tensor | None,
                 noise_state: torch.Tensor | None, generator: torch.Generator | None, *, steps: MaskedSampler,
                 start: int | None, guided: bool, cfg_scale: float, cfg_schedule: str, compile: bool) -> torch.Tensor:
        """``sample``'s reverse process from all [MASK] (known tokens kept) to ids (B, h, w): device work only,
        no host sync (``CallGraphs`` records it whole). start: the largest masked count of a row (confidence).
        noise_state: the generator's state on the device (``philox_noise.state_of``) when the draws make their
        noise from it (``confidence_step``'s noise_stream), else None."""
        stream = None if noise_state is None else philox_noise.NoiseStream(noise_state)
        B, L = classes_B.shape[0], self.config.num_tokens
        ids_BL = keep_known(torch.full((B, L), self.mask_id, dtype=torch.long, device=classes_B.device),
                            known_ids_BL, known_mask_BL)
        num_masked_start_B = (ids_BL == self.mask_id).sum(1)
        both_B = torch.cat([classes_B, torch.full_like(classes_B, self.config.null_class)]) if guided else None
        forward_rest, update_rest, forward_first, update_first = self._sampling_fns(compile)[:4]
        # at least one position (M_i = 0 only when nothing is left to generate, and the step still draws its noise)
        counts = None if start is None else [max(m, 1) for m in masked_counts(start, self.schedule, steps.num_steps)]
        for i, (t, s) in enumerate(steps.timesteps()):
            pos_BM = None if counts is None else dynamic_dim(masked_positions(ids_BL, self.mask_id, counts[i]), compile)
            U = unconditional_sequences(B, i, guided, known_ids_BL is not None)
            forward, update = (forward_first, update_first) if 0 < U < B else (forward_rest, update_rest)
            if guided:      # one forward on [cond; uncond] (B + U, M, V); the sampler step combines the halves
                pos_2BM = None if pos_BM is None else dynamic_dim(torch.cat([pos_BM, pos_BM[:U]]), compile)
                logits = forward(torch.cat([ids_BL, ids_BL[:U]]), both_B[:B + U], pos_2BM)
                scale = cfg_scale_at(cfg_scale, i / max(steps.num_steps - 1, 1), cfg_schedule)
            else:           # (B, M, V)
                logits, scale = forward(ids_BL, classes_B, pos_BM), None
            logits = dynamic_dim(logits, compile and pos_BM is not None)
            ids_BL = steps.step(logits, ids_BL, t, s, generator, num_masked_start_B=num_masked_start_B,
                                known_ids_BL=known_ids_BL, known_mask_BL=known_mask_BL, cfg_scale=scale,
                                update=update, positions_BM=pos_BM, noise_stream=stream)
        g = self.config.grid_size
        return ids_BL.view(B, g, g)


# ---- named sizes (parameter counts at codebook 16384, grid 16, 1000 classes; built and counted) ----
def _sized(dim: int, depth: int, heads: int, kw: dict) -> MaskedGenerator:
    base = dict(kind="masked", codebook_size=16384, grid_size=16, num_classes=1000, dim=dim, depth=depth, heads=heads)
    return MaskedGenerator(GeneratorConfig(**{**base, **kw}))


def masked_S(**kw) -> MaskedGenerator:     # 55.9M params (47.0M without embeddings)
    return _sized(512, 12, 8, kw)


def masked_B(**kw) -> MaskedGenerator:     # 110.9M params (97.6M without embeddings)
    return _sized(768, 12, 12, kw)


def masked_L(**kw) -> MaskedGenerator:     # 338.2M params (320.4M without embeddings)
    return _sized(1024, 24, 16, kw)
