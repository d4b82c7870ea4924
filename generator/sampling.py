"""Sampling pieces shared by every generator: temperature, top-k / top-p, classifier-free guidance,
categorical draws from an explicit ``torch.Generator``, and the inpainting rule.

CFG convention (Ho & Salimans): ``logits = uncond + s * (cond - uncond)``; ``s = 1`` is neutral
(exactly the conditional prediction), ``s = 0`` is unconditional.
"""
from __future__ import annotations

import torch

from generator.kth_largest import kth_largest

CFG_SCHEDULES = ("constant", "linear")


def cfg_combine(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def cfg_combine_doubled(logits_2B: torch.Tensor, scale: float | torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """``cfg_combine`` of a doubled batch [cond; uncond] (2B, ...), as the samplers run it -> (B, ...).

    ``batch`` = B, the conditional rows, when the unconditional half may be one row shared by all B (B + 1
    rows: the masked sampler's first step, where every unconditional sequence is the same); it broadcasts."""
    B = logits_2B.shape[0] // 2 if batch is None else batch
    if logits_2B.shape[0] not in (2 * B, B + 1):
        raise ValueError(f"guided logits have {logits_2B.shape[0]} rows: want 2B = {2 * B} or B + 1 = {B + 1}")
    return cfg_combine(logits_2B[:B], logits_2B[B:], scale)


def cfg_scale_at(scale: float, progress: float, schedule: str = "constant") -> float:
    """Guidance scale at ``progress`` in [0, 1] of sampling: constant, or a linear ramp from 1 to ``scale``."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * progress
    raise ValueError(f"cfg schedule '{schedule}' is not one of {list(CFG_SCHEDULES)}")


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (last dim). 0 / 1.0 disable each.

    Top-p keeps the smallest set of highest-probability tokens whose mass reaches ``top_p``
    (always at least one token).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = kth_largest(logits, top_k)        # one Triton program per row on CUDA, else torch.topk
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs        # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p                  # the first token always has mass_before 0
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def exponential_noise(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Exp(1) noise drawn from ``generator``; argmax(p / E) is a draw from p (the Gumbel-max trick)."""
    return fill_exponential_(torch.empty(shape, device=device, dtype=dtype), generator)


def fill_exponential_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``exponential_noise``'s draw into an existing tensor (a buffer a CUDA graph reads): the same
    numbers as ``exponential_noise(out.shape, ...)`` from the same generator state."""
    return out.exponential_(1.0, generator=generator)


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise -log(E), E ~ Exp(1)."""
    return -exponential_noise(shape, generator, device).log()


def draw_with_noise(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draw of ``sample_logits`` given its Exp(1) ``noise`` (same shape as ``logits``; None = greedy):
    ids = argmax(p / E) with p = softmax(top-k/top-p(logits / temperature)). A pure tensor function (no
    generator, no host sync), so compiled sampling steps (``torch.compile(fullgraph=True)``) use it with
    noise drawn outside. Returns (ids (...,) long, p (..., V) float32; None when greedy)."""
    logits = logits.float()
    if noise is None:
        return logits.argmax(dim=-1), None
    # shifted by the row max first: the same softmax (bit for bit at temperature 1), and a tiny temperature
    # gives -inf, not inf - inf = nan (which argmax would read as token 0)
    probs = top_k_top_p_filter((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p).softmax(dim=-1)
    return (probs / noise).argmax(dim=-1), probs


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ids from softmax(logits / temperature) restricted to top-k / top-p.

    Returns (ids (...,) long, probs (..., V) float32 of the filtered distribution).
    ``temperature == 0`` is greedy (argmax). The draw is argmax(p / E) with E ~ Exp(1), which has
    no host sync and is deterministic under ``generator`` (``draw_with_noise``).
    """
    if temperature == 0:
        ids, _ = draw_with_noise(logits, None)
        return ids, torch.nn.functional.one_hot(ids, logits.shape[-1]).float()
    noise = exponential_noise(logits.shape, generator, logits.device)
    return draw_with_noise(logits, noise, temperature, top_k, top_p)


def keep_known(ids: torch.Tensor, known_ids: torch.Tensor | None, known_mask: torch.Tensor | None) -> torch.Tensor:
    """The inpainting rule every generator uses: a known token is never changed."""
    if known_mask is None:
        return ids
    return torch.where(known_mask, known_ids, ids)


def cuda_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """``generator``, or ``device``'s default CUDA generator (what a draw with ``generator=None`` uses there)."""
    if generator is not None:
        return generator
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A torch.Generator on ``device`` seeded with ``seed`` (None -> None: use the global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
