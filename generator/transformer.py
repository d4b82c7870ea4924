"""The transformer backbone shared by the masked, autoregressive and next-scale generators.

Pre-norm blocks (RMSNorm, SwiGLU), attention through ``F.scaled_dot_product_attention`` (flash on
GPU when no explicit mask is given), RoPE over any number of position axes (2 for the token grid;
VAR uses fractional grid coordinates per scale), optional adaLN class modulation, and a static
pre-allocated KV cache that lives inside each attention module (gpt-fast style, so decoding can be
compiled and graph-captured).

Letters: B batch, L query length, S key length (cache slots), D width, H heads, K head dim,
F = K/2 rotary frequencies, A position axes.

Masks: ``mask=None`` is full attention; ``is_causal=True`` is causal over the inputs themselves;
a bool tensor (L, S) says which keys each query sees (True = visible). With a KV cache the keys are
all ``max_len`` slots, so the caller passes the rows of its (causal or block-causal) mask for the
query positions (AR decoding: the slot is a device tensor, so the step can be graph-captured); a mask
narrower than the cache covers its first S slots, and only those are read. When
a block is written at an int start with no mask, the queries attend to every filled slot
[0, start + L): VAR's scale-by-scale sampling, where scale k sees all coarser scales and itself,
without a mask (flash attention) and without reading the empty slots. Without a cache, a
``BlockCausal`` is the same block-causal attention as one SDPA call per group of blocks (VAR's
teacher forcing).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from generator.config import GeneratorConfig
from generator.decode_attention import attend_new_query, attend_one_query, use_new_query_kernel
from generator.fused_adaln import adaln_norm
from generator.fused_adaln import use_kernel as use_fused_adaln
from generator.fused_attention import fused_attention
from generator.fused_attention import use_kernel as use_fused_attention
from generator.fused_qk_rope import qkv_norm_rope as fused_qkv_norm_rope
from generator.fused_qk_rope import use_kernel as use_fused_qk_rope
from generator.fused_swiglu import fused_swiglu
from generator.fused_swiglu import use_kernel as use_fused_swiglu
from generator.matvec import linear_few_rows
from generator.matvec import use_kernel as use_matvec


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and returned in the input's dtype (nn.RMSNorm falls off its
    fused path under bf16 autocast when the weight is float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).type_as(x)


def rope_tables(positions_LA: torch.Tensor, head_dim: int, base: float = 10000.0,
                num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (num_prefix + L, K/2) for RoPE over A position axes.

    Each axis gets K/(2A) frequencies ``base^(-i/n)``; positions may be fractional. The first
    ``num_prefix`` rows are the identity rotation (prefix tokens such as the class token carry no
    position).
    """
    positions_LA = positions_LA.float()
    if positions_LA.dim() == 1:
        positions_LA = positions_LA[:, None]
    n_axes = positions_LA.shape[1]
    if head_dim % (2 * n_axes):
        raise ValueError(f"head_dim {head_dim} is not divisible by 2 * {n_axes} position axes")
    n = head_dim // (2 * n_axes)
    freqs_n = base ** (-torch.arange(n, dtype=torch.float64) / n)
    angles_LAn = positions_LA.double()[:, :, None] * freqs_n
    angles_LF = angles_LAn.reshape(positions_LA.shape[0], n_axes * n)
    angles_LF = torch.cat([angles_LF.new_zeros(num_prefix, angles_LF.shape[1]), angles_LF])
    return angles_LF.cos().float(), angles_LF.sin().float()


def apply_rope(x: torch.Tensor, cos_LF: torch.Tensor, sin_LF: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves of each head by the per-position angles (GPT-NeoX layout). The tables
    broadcast against x's leading dims: (L, F) for (..., L, K), (L, 1, F) for (B, L, H, K)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_LF - x2 * sin_LF, x2 * cos_LF + x1 * sin_LF], dim=-1)
    return out.type_as(x)


class KVCache(nn.Module):
    """Static (B, H, max_len, K) key/value buffers; ``update`` writes at positions, returns all slots."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.max_len = max_len
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def check_batch(self, batch: int) -> None:
        if batch != self.k.shape[0]:
            raise ValueError(f"KV cache was set up for batch {self.k.shape[0]}, got {batch}")

    def update(self, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor,
               pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write L new keys/values at ``pos`` (an int start, checked; or a LongTensor (L,) of slots,
        unchecked so it can be graph-captured: the sampler checks bounds before the loop)."""
        L = k_BHLK.shape[2]
        self.check_batch(k_BHLK.shape[0])
        if isinstance(pos, int):
            if pos < 0 or pos + L > self.max_len:
                raise ValueError(f"KV cache overflow: writing positions {pos}..{pos + L - 1} "
                                 f"into a cache of {self.max_len} slots")
            self.k[:, :, pos:pos + L] = k_BHLK
            self.v[:, :, pos:pos + L] = v_BHLK
        else:
            self.k.index_copy_(2, pos, k_BHLK.to(self.k.dtype))
            self.v.index_copy_(2, pos, v_BHLK.to(self.v.dtype))
        return self.k, self.v


class BlockCausal(NamedTuple):
    """Block-causal attention (VAR: a token sees its own block, a scale, and every earlier one) without a
    mask over the whole sequence: the queries of each group of rows [start, end) attend to keys [0, end)
    in one unmasked SDPA call (flash / cuDNN, forward and backward); only the first group, the small
    blocks merged, takes the bool mask. The query-key pairs computed are the mask's nonzero blocks plus
    the first group's masked part (VAR-d16, the mask has 286k of 462k: 289k with the scales of >= 64
    tokens alone, 5 calls; 311k with those of >= 169, 3 calls, the faster step: NOTES A25, A55), where one
    SDPA call with the mask computes all 462k pairs (A55: a slower step), and a FlexAttention BlockMask
    computes the pairs of every partly masked 128 x 128 tile."""
    first_mask: torch.Tensor | None     # bool (P, P) mask of the first group's rows [0, P); None: one block
    ends: tuple[int, ...]               # each group's end row, the first group's (P) included

    @classmethod
    def from_bounds(cls, bounds: Sequence[int], mask_LL: torch.Tensor, min_alone: int) -> "BlockCausal":
        """``bounds`` = [0, end of block 1, ..., L]; ``mask_LL`` the block-causal bool mask (its first P rows
        and columns are used). A block of at least ``min_alone`` rows is a group of its own; the blocks
        before the first such block are merged into the masked first group."""
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        first = max(1, next((i for i, n in enumerate(sizes) if n >= min_alone), len(sizes)))
        P = bounds[first]
        return cls(mask_LL[:P, :P] if first > 1 else None, tuple(bounds[first:]))

    def attend(self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor) -> torch.Tensor:
        """SDPA per group -> (B, H, L, K), a transposed view of a contiguous (B, L, H, K)."""
        outs, start = [], 0
        for i, end in enumerate(self.ends):
            out = F.scaled_dot_product_attention(q_BHLK[:, :, start:end], k_BHLK[:, :, :end], v_BHLK[:, :, :end],
                                                 attn_mask=self.first_mask if i == 0 else None)
            outs.append(out.transpose(1, 2))
            start = end
        return torch.cat(outs, dim=1).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.kv_cache: KVCache | None = None

    def new_query_kernel(self, qkv_BL3HK, mask_LS, cos_LF, cache_pos) -> bool:
        """Whether a step runs through ``attend_new_query``'s kernel: one new token per sequence written at a
        device slot of the cache, a (1, S) bool mask, plain RMSNorm (or no) qk-norms."""
        return (self.kv_cache is not None and isinstance(cache_pos, torch.Tensor) and qkv_BL3HK.shape[1] == 1
                and isinstance(mask_LS, torch.Tensor) and type(self.q_norm) is type(self.k_norm)
                and type(self.q_norm) in (RMSNorm, nn.Identity)
                and use_new_query_kernel(qkv_BL3HK[:, 0], self.kv_cache.k, mask_LS, cos_LF))

    def forward(self, x_BLD, cos_LF, sin_LF, mask_LS=None, is_causal=False, cache_pos=None, rows_BM=None,
                norm=None, residual=None, drop=None):
        """``mask_LS``: None, a bool (L, S) tensor (True = attend), or a ``BlockCausal`` (uncached forwards
        only: VAR's teacher-forced training and scoring). ``rows_BM`` (B, M) long: every row attends as usual,
        but only these rows' outputs are projected and returned, (B, M, D). ``norm``, ``residual``, ``drop``: a
        pre-norm block's sublayer, ``residual + drop(attention(norm(x)))`` (``linear`` fuses them into the
        projections of a few-rows step)."""
        B, L, D = x_BLD.shape
        grouped = isinstance(mask_LS, BlockCausal)
        if grouped and self.kv_cache is not None and cache_pos is not None:
            raise ValueError("a BlockCausal mask is for uncached forwards; cached steps take a bool mask")
        qkv_BL3HK = linear(self.qkv, x_BLD, norm=norm).view(B, L, 3, self.heads, self.head_dim)
        full = mask_LS is None and not is_causal and (self.kv_cache is None or cache_pos is None)
        if full and use_fused_attention(qkv_BL3HK, self.q_norm, self.k_norm):   # no-grad CUDA forwards (NOTES A29)
            out_BLD = fused_attention(qkv_BL3HK, self.q_norm, self.k_norm, cos_LF, sin_LF)
            return linear(self.proj, gather_rows(out_BLD, rows_BM), residual=residual, drop=drop)
        if self.new_query_kernel(qkv_BL3HK, mask_LS, cos_LF, cache_pos):   # a cached step on CUDA (NOTES A56)
            self.kv_cache.check_batch(B)
            out_BH1K = attend_new_query(qkv_BL3HK[:, 0], norm_weight(self.q_norm), norm_weight(self.k_norm),
                                        getattr(self.q_norm, "eps", 0.0), cos_LF, sin_LF, self.kv_cache.k,
                                        self.kv_cache.v, cache_pos, mask_LS)
            return linear(self.proj, gather_rows(out_BH1K.view(B, 1, D), rows_BM), residual=residual, drop=drop)
        # qk-norm and RoPE in the projection's own (B, L, H, K) order (the tables broadcast over heads), then
        # SDPA on (B, H, L, K) transposed views: flash attention's native layout, so no kernel moves q, k or
        # the qkv gradient across the head axis (NOTES A22: AR-L training 50.1% -> 54.3% MFU on an H200)
        if cache_pos is None and cos_LF.shape[0] == L and use_fused_qk_rope(qkv_BL3HK, self.q_norm, self.k_norm):
            q, k, v = fused_qkv_norm_rope(qkv_BL3HK, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                          cos_LF, sin_LF)                             # NOTES A63, A66
        else:
            q, k, v = qkv_BL3HK.unbind(2)
            cos, sin = cos_LF[:, None], sin_LF[:, None]
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = self.kv_cache.update(k, v, cache_pos)            # (B, H, S, K), all slots
            if isinstance(cache_pos, int) and mask_LS is None:     # a block written at a known start, no mask:
                k, v = k[:, :, :cache_pos + L], v[:, :, :cache_pos + L]   # attend to every filled slot (flash-able)
            elif mask_LS is not None:                             # the mask covers the first S slots
                k, v = k[:, :, :mask_LS.shape[-1]], v[:, :, :mask_LS.shape[-1]]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if grouped:
            out = mask_LS.attend(q, k, v)
        elif L == 1 and mask_LS is not None:                        # a cached decoding step
            out = attend_one_query(q, k, v, mask_LS)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LS, is_causal=is_causal and mask_LS is None)
        return linear(self.proj, gather_rows(out.transpose(1, 2).reshape(B, L, D), rows_BM), residual=residual,
                      drop=drop)


def norm_weight(norm: nn.Module) -> torch.Tensor | None:
    """An RMSNorm's weight; None for no norm (nn.Identity)."""
    return norm.weight if isinstance(norm, RMSNorm) else None


def linear(layer: nn.Linear, x: torch.Tensor, *, norm: nn.Module | None = None, glu: bool = False,
           residual: torch.Tensor | None = None, drop: nn.Module | None = None) -> torch.Tensor:
    """``residual + drop(layer(f(x)))``, f = ``norm``, or with ``glu`` silu(gate) * up over x's two halves (SwiGLU),
    or nothing; a missing residual or drop is left out. Through the few-rows mat-vec kernel, all of it one launch,
    where ``matvec.use_kernel`` holds (opted in: a cached decoding step at batch 1-4, NOTES A49, A52) and dropout
    is off; the torch ops everywhere else."""
    dropping = drop is not None and drop.training and drop.p > 0
    if (layer.bias is None and not dropping and (norm is None or type(norm) is RMSNorm)
            and use_matvec(x, layer.weight, glu)):
        return linear_few_rows(x, layer.weight, norm_weight=None if norm is None else norm.weight,
                               eps=1e-6 if norm is None else norm.eps, glu=glu, residual=residual)
    if norm is not None:
        x = norm(x)
    if glu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = layer(x) if drop is None else drop(layer(x))
    return y if residual is None else residual + y


def gather_rows(x_BLD: torch.Tensor, rows_BM: torch.Tensor | None) -> torch.Tensor:
    """x's rows ``rows_BM`` (B, M) of each sequence, (B, M, D); all of x when rows_BM is None."""
    return x_BLD if rows_BM is None else x_BLD.gather(1, rows_BM[..., None].expand(-1, -1, x_BLD.shape[-1]))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)     # fused: one matmul for both branches
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, norm=None, residual=None, drop=None):
        """``residual + drop(mlp(norm(x)))``; without them the MLP alone (see ``linear``)."""
        if use_fused_swiglu(x, self.gate_up.weight):          # no-grad CUDA forwards (NOTES A31)
            h = fused_swiglu(x if norm is None else norm(x), self.gate_up.weight)
            return linear(self.down, h, residual=residual, drop=drop)
        return linear(self.down, linear(self.gate_up, x, norm=norm), glu=True, residual=residual, drop=drop)


class Block(nn.Module):
    """Pre-norm block; with adaLN, a class vector gives per-block shift/scale/gate (zero-init)."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        D = config.dim
        self.norm1 = RMSNorm(D, eps=1e-6)
        self.attn = Attention(D, config.heads, config.qk_norm)
        self.norm2 = RMSNorm(D, eps=1e-6)
        self.mlp = SwiGLU(D, config.mlp_hidden)
        self.drop = nn.Dropout(config.dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D)) if config.adaln else None

    def forward(self, x_BLD, cos_LF, sin_LF, cond_BD=None, mask_LS=None, is_causal=False, cache_pos=None,
                rows_BM=None):
        """``rows_BM`` (B, M) long: every row attends (keys and values of all), but the rest of the block runs
        only at these rows, and returns them, (B, M, D)."""
        if self.ada is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond_BD)[:, None].chunk(6, dim=-1)
            h = self.norm1(x_BLD) * (1 + scale1) + shift1
            x_BLD = gather_rows(x_BLD, rows_BM) + gate1 * self.drop(
                self.attn(h, cos_LF, sin_LF, mask_LS, is_causal, cache_pos, rows_BM))
            h = self.norm2(x_BLD) * (1 + scale2) + shift2
            return x_BLD + gate2 * self.drop(self.mlp(h))
        x_BLD = self.attn(x_BLD, cos_LF, sin_LF, mask_LS, is_causal, cache_pos, rows_BM, norm=self.norm1,
                          residual=gather_rows(x_BLD, rows_BM), drop=self.drop)
        return self.mlp(x_BLD, norm=self.norm2, residual=x_BLD, drop=self.drop)

    def forward_fused_adaln(self, x_BLD, cos_LF, sin_LF, cond_BD, pending, mask_LS=None, is_causal=False):
        """The adaLN block with each residual add and the modulated norm after it as one op (generator/fused_adaln.py).
        ``pending`` (y, gate): the previous block's MLP output and gate, not yet added to x ((None, None) at the
        first block). Returns x with this block's attention added, and this block's pending (y, gate)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond_BD).chunk(6, dim=-1)
        x_BLD, h = adaln_norm(x_BLD, self.norm1.weight, scale1, shift1, self.norm1.eps, *pending)
        x_BLD, h = adaln_norm(x_BLD, self.norm2.weight, scale2, shift2, self.norm2.eps,
                              self.drop(self.attn(h, cos_LF, sin_LF, mask_LS, is_causal)), gate1)
        return x_BLD, (self.drop(self.mlp(h)), gate2)


class Transformer(nn.Module):
    """Embeddings in, normalised hidden states out: (B, L, D) -> (B, L, D)."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.dim, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 2 * config.dim)) if config.adaln else None

    def forward(self, x_BLD, cos_LF, sin_LF, cond_BD=None, mask_LS=None, is_causal=False, cache_pos=None,
                rows_BM=None):
        """``rows_BM`` (B, M) long: only these rows' outputs are wanted, (B, M, D). The last block still attends
        over every row, but runs its projection, MLP and norms only at them (a masked sampler's later steps
        need a third of the rows or fewer)."""
        if self.final_ada is not None and rows_BM is None and cache_pos is None and use_fused_adaln(x_BLD):
            return self.forward_fused_adaln(x_BLD, cos_LF, sin_LF, cond_BD, mask_LS, is_causal)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x_BLD = block(x_BLD, cos_LF, sin_LF, cond_BD, mask_LS, is_causal, cache_pos, rows_BM if i == last else None)
        h = self.norm(x_BLD)
        if self.final_ada is not None:
            shift, scale = self.final_ada(cond_BD)[:, None].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return h

    def forward_fused_adaln(self, x_BLD, cos_LF, sin_LF, cond_BD, mask_LS=None, is_causal=False):
        """``forward`` of adaLN blocks in training (``fused_adaln.use_kernel``): each block leaves its gated MLP output
        for the next block's first norm (or the final one) to add. The final h is in the compute dtype (the head's
        input), not float32."""
        pending = (None, None)
        for block in self.blocks:
            x_BLD, pending = block.forward_fused_adaln(x_BLD, cos_LF, sin_LF, cond_BD, pending, mask_LS, is_causal)
        shift, scale = self.final_ada(cond_BD).chunk(2, dim=-1)
        return adaln_norm(x_BLD, self.norm.weight, scale, shift, self.norm.eps, *pending)[1]

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype, device, reuse: bool = False) -> None:
        """Pre-allocate a KV cache in every attention module (replacing any previous one). ``reuse``: keep
        the present caches when they already have this shape, dtype and device (same buffers, so CUDA
        graphs that read them in place stay valid; their contents are stale, not zeroed)."""
        c = self.config
        shape, device = (batch, c.heads, max_len, c.head_dim), torch.empty(0, device=device).device   # cuda -> cuda:0
        for block in self.blocks:
            cache = block.attn.kv_cache
            if (reuse and cache is not None and tuple(cache.k.shape) == shape and cache.k.dtype == dtype
                    and cache.k.device == device):
                continue
            block.attn.kv_cache = KVCache(batch, c.heads, max_len, c.head_dim, dtype, device)

    def reset_caches(self) -> None:
        for block in self.blocks:
            if block.attn.kv_cache is not None:
                block.attn.kv_cache.reset()

    def remove_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None


def init_weights(module: nn.Module, depth: int) -> None:
    """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * depth), adaLN at zero
    (so every block starts as the plain pre-norm block)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("attn.proj", "mlp.down")) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for name, m in module.named_modules():
        if name.endswith(("ada", "final_ada")) and isinstance(m, nn.Sequential):
            nn.init.zeros_(m[1].weight)
            nn.init.zeros_(m[1].bias)


def flops_per_token(config: GeneratorConfig, context: int, training: bool = True) -> float:
    """Model FLOPs per token (PaLM convention): 2 per weight multiply-add in the blocks and head,
    plus attention's QK^T and AV (4 * context * D per layer, counted in full even when causal);
    training is 3x the forward (forward + backward)."""
    c = config
    # multiply-adds per token: qkv + proj, SwiGLU; adaLN's (D -> 6D) runs once per sequence
    per_block = 4 * c.dim * c.dim + 3 * c.dim * c.mlp_hidden + (6 * c.dim * c.dim if c.adaln else 0) / max(context, 1)
    matmul = c.depth * per_block + c.dim * c.codebook_size
    forward = 2 * matmul + 4 * c.depth * context * c.dim
    return 3 * forward if training else forward
