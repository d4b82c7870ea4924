"""Vector quantisation: one nearest-code lookup shared by the LlamaGen-style ``VectorQuantizer`` and
VAR's residual ``MultiScaleQuantizer``.

VQ-VAE (van den Oord et al. 2017): z_q = e_{k*}, k* = argmin_k ||z - e_k||, straight-through gradient,
loss = ||z_q - sg[z]||^2 + beta ||z - sg[z_q]||^2. LlamaGen (Sun et al. 2024): low-dimensional,
l2-normalised codes and the MaskGIT/MAGVIT entropy loss. VAR (Tian et al. 2024, Alg. 1): residual
quantisation over a pyramid of scales, each scale refined by a Phi conv.

Letters: B batch, C code dim, H W (h w) grid, N = number of vectors, V codebook size, K scales,
s side of one scale, G usage groups (1 for VQ, K for multiscale), R recent-vector buffer rows.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's pyramid for a 16x16 grid
_LOOKUP_CHUNK = 1 << 24  # max N*V distance entries per chunk: bounds memory for V=16384 codes


@torch.no_grad()
def nearest_code(z_NC: torch.Tensor, codebook_VC: torch.Tensor, l2_normalize: bool) -> torch.Tensor:
    """Id of the nearest code for each row: argmin_k ||z - e_k||^2 (cosine when ``l2_normalize``).

    z_NC (N, C) float, codebook_VC (V, C) float -> ids_N long. The one nearest-code search of the
    package; chunked over N so an (N, V) distance matrix never has to fit in memory at once.
    """
    z_NC, e_VC = z_NC.detach().float(), codebook_VC.detach().float()
    if l2_normalize:
        z_NC, e_VC = F.normalize(z_NC, dim=-1), F.normalize(e_VC, dim=-1)
    e_sq_V = e_VC.square().sum(-1)
    rows = max(1, _LOOKUP_CHUNK // e_VC.shape[0])
    # ||z||^2 is constant per row, so argmin ||z-e||^2 = argmin (||e||^2 - 2 z.e)
    return torch.cat([torch.argmin(e_sq_V - 2 * z @ e_VC.T, dim=1) for z in z_NC.split(rows)])


def code_distances(z_NC: torch.Tensor, codebook_VC: torch.Tensor, l2_normalize: bool) -> torch.Tensor:
    """Squared distances (N, V) with gradients to both inputs (the entropy loss needs them)."""
    if l2_normalize:
        z_NC, codebook_VC = F.normalize(z_NC, dim=-1), F.normalize(codebook_VC, dim=-1)
    return (z_NC.square().sum(-1, keepdim=True) + codebook_VC.square().sum(-1)
            - 2 * z_NC @ codebook_VC.T)


def entropy_loss(affinity_NV: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """MaskGIT/LlamaGen codebook entropy loss: mean per-sample entropy minus entropy of the batch mean.

    Minimising it makes each vector confident about one code while the batch spreads over all codes.
    Bounds: >= -log V (confident, uniform over the batch); 0 when every sample has the same distribution.
    """
    logits_NV = affinity_NV.float() / temperature
    probs_NV = logits_NV.softmax(-1)
    sample_entropy = -(probs_NV * logits_NV.log_softmax(-1)).sum(-1).mean()
    avg_V = probs_NV.mean(0)
    batch_entropy = -(avg_V * torch.log(avg_V + 1e-5)).sum()
    return sample_entropy - batch_entropy


def perplexity(ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(entropy) of the code histogram of ``ids``: 1 = one code used, V = all codes equally."""
    p_V = ids.flatten().bincount(minlength=codebook_size).float()
    p_V = p_V / p_V.sum().clamp(min=1)
    return torch.exp(-(p_V * torch.log(p_V + 1e-10)).sum())


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor            # (B, C, H, W) quantised map with straight-through gradients to z
    ids: object                  # VQ: ids_Bhw long; multiscale: list of (B, s, s) long, coarse -> fine
    loss: torch.Tensor           # scalar: codebook + beta * commitment (+ entropy)
    stats: dict[str, torch.Tensor]   # detached scalars: perplexity, usage, restarted, ...


class Codebook(nn.Module):
    """Code vectors plus usage tracking and dead-code restart (all tracking buffers non-persistent).

    A code is *dead* when no group has used it during the last ``window`` training steps (and it was
    not restarted in that time); it is then re-initialised from a buffer of recent input vectors.
    Counters are 0-dim tensors: no device syncs, and a trainer can checkpoint them with the other
    non-persistent buffers for an exact resume. Nothing here changes outside training mode.
    """

    def __init__(self, size: int, dim: int, l2_normalize: bool, window: int = 100,
                 groups: int = 1, buffer_rows: int | None = None):
        super().__init__()
        self.size, self.dim, self.l2_normalize, self.window = size, dim, l2_normalize, window
        weight_VC = torch.empty(size, dim).uniform_(-1 / size, 1 / size)   # taming/VAR init
        # unit rows when only directions count (as LlamaGen): at norm ~1/V the gradient through
        # normalize grows as 1/norm, and one optimizer step would turn a code by tens of degrees
        self.weight = nn.Parameter(F.normalize(weight_VC, dim=-1) if l2_normalize else weight_VC)
        rows = max(buffer_rows or size, size)   # >= size rows: every dead code gets a distinct vector
        self.register_buffer("last_used_GV", torch.full((groups, size), -1, dtype=torch.long), persistent=False)
        self.register_buffer("last_reset_V", torch.zeros(size, dtype=torch.long), persistent=False)
        self.register_buffer("recent_RC", torch.zeros(rows, dim), persistent=False)
        for counter in ("step", "recent_ptr", "recent_filled"):   # training steps; ring-buffer position/fill
            self.register_buffer(counter, torch.zeros((), dtype=torch.long), persistent=False)

    def vectors(self) -> torch.Tensor:
        """(V, C) code vectors as used for lookup/embedding (unit-norm when ``l2_normalize``)."""
        return F.normalize(self.weight, dim=-1) if self.l2_normalize else self.weight

    def lookup(self, z_NC: torch.Tensor) -> torch.Tensor:
        return nearest_code(z_NC, self.weight, self.l2_normalize)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) long -> (..., C) float32 code vectors (gradients reach the codebook)."""
        return F.embedding(ids.long(), self.vectors().float())

    @torch.no_grad()
    def record(self, ids: torch.Tensor, group: int = 0) -> None:
        """Mark the codes in ``ids`` as used at the current step (training only). Under torch.distributed
        a code used on any rank counts as used (a DDP forward broadcasts rank 0's buffers, so usage kept
        per rank would declare codes used only on other ranks dead)."""
        used_V = torch.zeros(self.size, dtype=torch.int32, device=ids.device)
        used_V[ids.flatten()] = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(used_V, op=dist.ReduceOp.MAX)
        self.last_used_GV[group] = torch.where(used_V.bool(), self.step, self.last_used_GV[group])

    @torch.no_grad()
    def remember(self, z_NC: torch.Tensor, rows: int, generator: torch.Generator | None = None) -> None:
        """Push ``rows`` randomly chosen vectors of ``z_NC`` into the ring buffer of recent inputs."""
        R = self.recent_RC.shape[0]
        n = min(rows, z_NC.shape[0], R)
        pick = _randperm(z_NC.shape[0], generator, z_NC.device)[:n]
        slots = (self.recent_ptr + torch.arange(n, device=z_NC.device)) % R
        self.recent_RC[slots] = z_NC.detach().float()[pick]
        self.recent_ptr.copy_((self.recent_ptr + n) % R)
        self.recent_filled.copy_((self.recent_filled + n).clamp(max=R))

    @torch.no_grad()
    def restart_dead(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-initialise dead codes from recent inputs (distinct rows); returns how many (0-dim long).

        Deterministic given ``generator`` (or the global RNG). Under torch.distributed the codebook is
        then broadcast from rank 0, so every rank keeps identical weights.
        """
        R, V = self.recent_RC.shape[0], self.size
        last_V = torch.maximum(self.last_used_GV.amax(0), self.last_reset_V)
        # unused in steps step-window .. step-1; wait for a full buffer so that sources are distinct
        dead_V = ((self.step - last_V) > self.window) & (self.recent_filled >= R)
        src_V = _randperm(R, generator, self.weight.device)[:V]
        self.weight.copy_(torch.where(dead_V[:, None], self.recent_RC[src_V].to(self.weight.dtype), self.weight))
        self.last_reset_V.copy_(torch.where(dead_V, self.step, self.last_reset_V))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.weight.data, src=0)
        return dead_V.sum()

    def usage(self, group: int | None = None) -> torch.Tensor:
        """Fraction of codes used (by ``group``, or by any group) in the last ``window`` training steps."""
        last = self.last_used_GV.amax(0) if group is None else self.last_used_GV[group]
        return ((last >= 0) & (last >= self.step - self.window)).float().mean()


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def _to_NC(x_BChw: torch.Tensor) -> torch.Tensor:
    return x_BChw.permute(0, 2, 3, 1).reshape(-1, x_BChw.shape[1])


class VectorQuantizer(nn.Module):
    """LlamaGen-style VQ: nearest code (cosine if ``l2_normalize``), straight-through, restarts."""

    def __init__(self, codebook_size: int, codebook_dim: int, l2_normalize: bool = True, beta: float = 0.25,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01, restart_dead_codes: bool = True,
                 usage_window: int = 100):
        super().__init__()
        self.codebook = Codebook(codebook_size, codebook_dim, l2_normalize, usage_window)
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature
        self.restart_dead_codes = restart_dead_codes

    def forward(self, z_BChw: torch.Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        """z_BChw (B, C, h, w) -> QuantizerOutput(z_q (B, C, h, w), ids (B, h, w), loss, stats).

        Runs in float32 (autocast off): an 8-dim lookup in bf16 would pick wrong codes.
        """
        cb, (B, C, h, w) = self.codebook, z_BChw.shape
        with torch.autocast(z_BChw.device.type, enabled=False):
            restarted = (cb.restart_dead(generator) if self.training and self.restart_dead_codes
                         else torch.zeros((), dtype=torch.long, device=z_BChw.device))
            z_NC = _to_NC(z_BChw.float())
            if cb.l2_normalize:
                z_NC = F.normalize(z_NC, dim=-1)
            ids_N = cb.lookup(z_NC)
            zq_NC = cb.embed(ids_N)
            codebook_loss = F.mse_loss(zq_NC, z_NC.detach())
            commit_loss = F.mse_loss(z_NC, zq_NC.detach())
            loss = codebook_loss + self.beta * commit_loss
            stats = {"codebook_loss": codebook_loss.detach(), "commit_loss": commit_loss.detach()}
            if self.entropy_weight > 0:
                ent = entropy_loss(-code_distances(z_NC, cb.weight, cb.l2_normalize), self.entropy_temperature)
                loss = loss + self.entropy_weight * ent
                stats["entropy_loss"] = ent.detach()
            zq_NC = z_NC + (zq_NC - z_NC).detach()   # straight-through: d z_q / d z = I
            if self.training:
                cb.record(ids_N)
                cb.remember(z_NC, rows=cb.recent_RC.shape[0], generator=generator)
                cb.step.add_(1)
        stats.update(perplexity=perplexity(ids_N, cb.size), usage=cb.usage(), restarted=restarted)
        z_q = zq_NC.view(B, h, w, C).permute(0, 3, 1, 2).contiguous()
        return QuantizerOutput(z_q, ids_N.view(B, h, w), loss, stats)

    def lookup_ids(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Pure lookup (no stats, no restarts): z (B, C, h, w) -> ids (B, h, w) long."""
        B, _, h, w = z_BChw.shape
        return self.codebook.lookup(_to_NC(z_BChw.float())).view(B, h, w)

    def embed_ids(self, ids_Bhw: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) long -> z_q (B, C, h, w) float32."""
        return self.codebook.embed(ids_Bhw).permute(0, 3, 1, 2).contiguous()


class Phi(nn.Conv2d):
    """VAR's refinement of an upsampled scale: x * (1 - ratio) + conv3x3(x) * ratio."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 - self.ratio) + super().forward(x) * self.ratio


class NextScale(NamedTuple):
    f_hat: torch.Tensor                 # (B, C, H, W) running sum of the scale contributions
    next_input: torch.Tensor | None     # (B, s_{k+1}^2, C) area-downsampled f_hat, raster order; None at the end


class MultiScaleQuantizer(nn.Module):
    """VAR residual multi-scale quantisation with one shared codebook and ``phi_count`` shared Phis.

    Scale k (0-based): ids_k = lookup(area(residual, s_k)); h_k = Phi_k(upsample(embed(ids_k)));
    f_hat += h_k; residual -= h_k. Loss (VAR's quant.py): the mean over scales of
    ||f_hat_k - sg[z]||^2 + beta ||sg[f_hat_k] - z||^2 on the running sums f_hat_k, so coarse scales get
    their own signal; the final f_hat reaches the decoder with straight-through gradients to z.
    ``l2_normalize`` picks codes by cosine (VAR's ``using_znorm``) but embeds the raw vectors,
    because residuals shrink scale by scale and unit-norm codes could not represent them.
    """

    def __init__(self, codebook_size: int, codebook_dim: int, scales: tuple[int, ...] = VAR_SCALES,
                 phi_count: int = 4, phi_ratio: float = 0.5, l2_normalize: bool = False, beta: float = 0.25,
                 restart_dead_codes: bool = True, usage_window: int = 100):
        super().__init__()
        self.scales, self.beta, self.restart_dead_codes = tuple(scales), beta, restart_dead_codes
        self.codebook = Codebook(codebook_size, codebook_dim, False, usage_window, groups=len(scales))
        self.cosine_lookup = l2_normalize
        self.phis = nn.ModuleList(Phi(codebook_dim, phi_ratio) for _ in range(phi_count))

    def phi_index(self, k: int) -> int:
        """Phi used at scale k: round-half-up(k / (K - 1) * (phi_count - 1)), evenly spread over the scales.

        VAR's PhiPartiallyShared shares phi_count Phi the same way but picks the nearest of its own ticks,
        so some scales get a neighbouring Phi (6 scales, 4 Phi: here 0,1,1,2,2,3, VAR 0,0,1,2,3,3); VAR's
        released weights would need its assignment. Shipped checkpoints use this one."""
        K = len(self.scales)
        return 0 if K == 1 else int(math.floor(k / (K - 1) * (len(self.phis) - 1) + 0.5))

    def scale_residual(self, ids_Bss: torch.Tensor, k: int) -> torch.Tensor:
        """h_k = Phi_k(upsample(embed(ids_k))): ids (B, s_k, s_k) -> (B, C, H, W) float32.

        The one place that turns scale-k ids into features; forward, decode and the VAR inputs use it.
        """
        H = self.scales[-1]
        with torch.autocast(ids_Bss.device.type, enabled=False):
            h_BChw = self.codebook.embed(ids_Bss).permute(0, 3, 1, 2)
            if ids_Bss.shape[-1] != H:
                h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")   # as VAR
            return self.phis[self.phi_index(k)](h_BChw.contiguous())

    def next_scale_input(self, f_hat_BChw: torch.Tensor | None, ids_Bss: torch.Tensor, k: int) -> NextScale:
        """f_hat += h_k; next input = area(f_hat, s_{k+1}) flattened (B, s^2, C) (None at the last scale)."""
        h_BChw = self.scale_residual(ids_Bss, k)
        f_hat_BChw = h_BChw if f_hat_BChw is None else f_hat_BChw.float() + h_BChw
        if k + 1 >= len(self.scales):
            return NextScale(f_hat_BChw, None)
        nxt = _area(f_hat_BChw, self.scales[k + 1])
        return NextScale(f_hat_BChw, nxt.flatten(2).transpose(1, 2))

    def f_hat_from_ids(self, ids_list: list[torch.Tensor]) -> torch.Tensor:
        """Sum of all scale contributions: list of (B, s_k, s_k) -> f_hat (B, C, H, W)."""
        f_hat = None
        for k, ids in enumerate(ids_list):
            f_hat = self.next_scale_input(f_hat, ids, k).f_hat
        return f_hat

    def forward(self, f_BChw: torch.Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        """f (B, C, H, W) -> QuantizerOutput(z_q = f_hat (B, C, H, W), ids [(B, s_k, s_k)], loss, stats)."""
        cb, K, B = self.codebook, len(self.scales), f_BChw.shape[0]
        stats: dict[str, torch.Tensor] = {}
        with torch.autocast(f_BChw.device.type, enabled=False):
            restarted = (cb.restart_dead(generator) if self.training and self.restart_dead_codes
                         else torch.zeros((), dtype=torch.long, device=f_BChw.device))
            f = f_BChw.float()
            f_ng = f.detach()
            rest, f_hat, loss, ids_list = f_ng.clone(), torch.zeros_like(f_ng), f.new_zeros(()), []
            for k, s in enumerate(self.scales):
                rest_NC = _to_NC(_area(rest, s))
                ids = nearest_code(rest_NC, cb.weight, self.cosine_lookup).view(B, s, s)
                h_BChw = self.scale_residual(ids, k)
                f_hat = f_hat + h_BChw
                rest = rest - h_BChw.detach()
                loss = loss + F.mse_loss(f_hat, f_ng) + self.beta * F.mse_loss(f_hat.detach(), f)
                ids_list.append(ids)
                if self.training:
                    cb.record(ids, group=k)
                    # equal share per scale: coarse residuals seed restarts too (guards coarse collapse)
                    cb.remember(rest_NC, rows=-(-cb.recent_RC.shape[0] // K), generator=generator)
            if self.training:
                cb.step.add_(1)
            z_q = f_hat.detach() + (f - f_ng)   # straight-through; value equals f_hat exactly
        for k, (s, ids) in enumerate(zip(self.scales, ids_list)):
            stats[f"perplexity_{s}x{s}"] = perplexity(ids, cb.size)
            stats[f"usage_{s}x{s}"] = cb.usage(k)
        stats.update(perplexity=perplexity(torch.cat([i.flatten() for i in ids_list]), cb.size),
                     usage=cb.usage(), restarted=restarted, vq_loss=(loss / K).detach())
        return QuantizerOutput(z_q, ids_list, loss / K, stats)

    def lookup_ids(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Pure residual quantisation (no stats, no restarts): f -> list of (B, s_k, s_k) long."""
        with torch.no_grad(), torch.autocast(f_BChw.device.type, enabled=False):
            rest, ids_list, B = f_BChw.float(), [], f_BChw.shape[0]
            for k, s in enumerate(self.scales):
                ids = nearest_code(_to_NC(_area(rest, s)), self.codebook.weight, self.cosine_lookup).view(B, s, s)
                rest = rest - self.scale_residual(ids, k)
                ids_list.append(ids)
        return ids_list


def _area(x_BChw: torch.Tensor, s: int) -> torch.Tensor:
    """Area-downsample to s x s (identity when already that size)."""
    return x_BChw if x_BChw.shape[-1] == s else F.interpolate(x_BChw, size=(s, s), mode="area")
