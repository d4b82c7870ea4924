"""Masking schedules alpha(t) of absorbing diffusion and their loss weights.

Forward marginal (seed 002, "q_t(x_t|x_0) = Cat(alpha_t x_0 + (1 - alpha_t) m)"): a token is still
clean at time t with probability alpha(t), else it is [MASK]. Time runs t in [0, 1], clean at t = 0
(alpha(0) = 1) and fully masked at t = 1 (alpha(1) = 0). Sampling walks t from 1 down to 0, so
MaskGIT's "mask ratio after a fraction r of the sampling steps", gamma(r), is 1 - alpha(1 - r).

A schedule is a pair of plain callables on float tensors: ``alpha(t)`` and its analytic derivative
``alpha_prime(t)`` (tested against finite differences). Schedules:

- ``linear``:    alpha = 1 - t,                    alpha' = -1.  (MDLM / MD4 linear)
- ``cosine``:    alpha = 1 - sin(pi/2 t),          alpha' = -(pi/2) cos(pi/2 t).
                 This is MaskGIT's cosine: gamma(r) = cos(pi/2 r), i.e. MD4's
                 alpha = 1 - cos(pi/2 (1 - t)). (alpha = cos(pi/2 t) would be its mirror image:
                 it masks few tokens in training and unmasks most tokens in the first steps.)
- ``arccos``:    alpha = 1 - (2/pi) arccos(1 - t), alpha' = -(2/pi) / sqrt(t (2 - t)).
                 MaskGIT-pytorch / Halton-MaskGIT's arccos: gamma(r) = (2/pi) arccos(r).
- ``loglinear``: MDLM's LogLinearNoise: total noise sigma(t) = -log(1 - (1 - eps) t) and
                 alpha = exp(-sigma) = 1 - (1 - eps) t, alpha' = -(1 - eps), eps = 1e-3. So
                 alpha(1) = eps, not 0: sigma stays finite at t = 1. Its ELBO weight is exactly 1/t,
                 like linear. Samplers start fully masked at t = 1 (MDLM's approximation; the
                 difference from q(x_1|x_0) is eps per token).

Loss weights ``loss_weight(t, schedule, weighting)``: ``maskgit`` -> 1; ``elbo`` ->
-alpha'(t) / (1 - alpha(t)) (seed 002's NELBO weight alpha'_t / (1 - alpha_t) with the sign that
makes the loss positive; = 1/t for linear). Near t = 0 the ELBO weight diverges (~1/t) while the
expected masked fraction 1 - alpha(t) vanishes; their product -alpha'(t) stays finite. Every t is
clamped to [T_MIN, 1] with T_MIN = 1e-4 before use, which bounds w <= ~1e4 and changes only a
1e-4-wide sliver of the time integral.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

T_MIN = 1e-4            # smallest time used anywhere: bounds the ELBO weight ~1/t
LOGLINEAR_EPS = 1e-3    # MDLM's eps: alpha(1) = eps for the loglinear schedule
WEIGHTINGS = ("maskgit", "elbo")


class Schedule(NamedTuple):
    name: str
    alpha: Callable[[torch.Tensor], torch.Tensor]         # probability a token is still clean at t
    alpha_prime: Callable[[torch.Tensor], torch.Tensor]   # d alpha / dt (<= 0)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha(t)


def _linear(t):
    return 1 - t


def _linear_prime(t):
    return -torch.ones_like(t)


def _cosine(t):
    return 1 - torch.sin(0.5 * math.pi * t)


def _cosine_prime(t):
    return -0.5 * math.pi * torch.cos(0.5 * math.pi * t)


def _arccos(t):
    return 1 - (2 / math.pi) * torch.arccos(1 - t)


def _arccos_prime(t):
    # d/dt arccos(1 - t) = 1 / sqrt(1 - (1 - t)^2) = 1 / sqrt(t (2 - t)); infinite at t = 0
    return -(2 / math.pi) / torch.sqrt(t * (2 - t))


def _loglinear(t):
    return torch.exp(torch.log1p(-(1 - LOGLINEAR_EPS) * t))   # exp(-sigma(t)) = 1 - (1 - eps) t


def _loglinear_prime(t):
    return torch.full_like(t, -(1 - LOGLINEAR_EPS))


SCHEDULES: dict[str, Schedule] = {
    "linear": Schedule("linear", _linear, _linear_prime),
    "cosine": Schedule("cosine", _cosine, _cosine_prime),
    "arccos": Schedule("arccos", _arccos, _arccos_prime),
    "loglinear": Schedule("loglinear", _loglinear, _loglinear_prime),
}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"schedule '{name}' is not one of {list(SCHEDULES)}")
    return SCHEDULES[name]


def as_time(t) -> torch.Tensor:
    """Float tensor of times clamped to [T_MIN, 1] (floats and ints become float64 scalars)."""
    t = t if torch.is_tensor(t) and t.is_floating_point() else torch.as_tensor(t, dtype=torch.float64)
    return t.clamp(T_MIN, 1.0)


@functools.lru_cache(maxsize=4096)
def alpha_at(schedule: Schedule, t: float) -> float:
    """alpha(t) as a Python float, for the sampler's host-side time grid (t in [0, 1], unclamped); on the
    CPU whatever the default device (e.g. under ``torch.device("meta")``). Cached: a 16-step sampling call
    asks for the same few dozen values each time (computing them took ~1.6 ms of host time per call while
    the GPU waited for its first kernel: H200 profile, NOTES A32)."""
    return float(schedule.alpha(torch.tensor(float(t), dtype=torch.float64, device="cpu")))


def loss_weight(t: torch.Tensor, schedule: Schedule, weighting: str) -> torch.Tensor:
    """w(t) for the masked cross-entropy (seed 004's L_mask, seed 002's NELBO weight).

    t: (B,) float times in [0, 1] (clamped to [T_MIN, 1]). Returns (B,) float32 weights;
    computed in float64 so 1 - alpha(t) keeps its digits near t = 0.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting '{weighting}' is not one of {list(WEIGHTINGS)}")
    t = as_time(t)
    if weighting == "maskgit":
        return torch.ones_like(t, dtype=torch.float32)
    t64 = t.double()
    return (-schedule.alpha_prime(t64) / (1 - schedule.alpha(t64))).float()
