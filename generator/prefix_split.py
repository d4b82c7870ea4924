"""Full attention of L = P + N rows with the N rows through SDPA at whole tiles, for training (NOTES A64).

The masked generator's sequence is 1 class token + 256 grid tokens: 257 rows, so flash / cuDNN attention pays a
third 128-row query tile and a fifth 64-row key tile for one token (masked-L training: ~105 TFLOP/s in its attention,
A64). Full attention does not care which rows come first, so the leading P = L mod TILE rows are split off:

- the other N rows attend to the N keys in one SDPA call that also returns its log-sum-exp lse_N (whole tiles);
- the P keys are merged into those rows exactly: s = q k_P^T scale, lse = log(e^lse_N + sum_P e^s),
  out = e^(lse_N - lse) o_N + e^(s - lse) v_P;
- the P rows attend to every key through SDPA (a few rows).

The backward of the N rows: SDPA's backward with the gradient a dO (a = e^(lse_N - lse)) and the merged output in
place of o_N. Flash / cuDNN read the output only for D = rowsum(dO' * out), and rowsum(a dO * out) is the full
softmax's D times a, so the dq, dk, dv it returns are the full attention's (every score's gradient is
P_full (dO v - D), P_full = a P_N). The P keys' parts in torch ops: dS = e^(s - lse) (dO v_P^T - D),
dq += scale dS k_P, dk_P = scale dS^T q, dv_P = e^(s - lse)^T dO.

Opt-in (``TESSERA_PREFIX_SPLIT=1``, or ``ENABLED``) until measured on the GPU; gen_train's compile variant
``prefix-split`` and job ``train-masked-L-split`` compare it (predicted: ~-8 to -15 ms a masked-L step). SDPA's kernels: cuDNN's (``BACKEND`` "cudnn", what SDPA
picks on an H100 with torch 2.11) or flash's ("flash") on CUDA, the CPU's flash kernel elsewhere (the tests).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

ENABLED = os.environ.get("TESSERA_PREFIX_SPLIT", "0") == "1"
BACKEND = os.environ.get("TESSERA_PREFIX_SPLIT_BACKEND", "cudnn")       # on CUDA: "cudnn" or "flash"
if BACKEND not in ("cudnn", "flash"):
    raise ValueError(f"TESSERA_PREFIX_SPLIT_BACKEND={BACKEND!r}: expected 'cudnn' or 'flash'")
TILE = 128              # the query tile the N rows should fill
MAX_PREFIX = 16         # a guess: past this many leading rows the torch-ops merge may cost more than it saves


def prefix_rows(L: int) -> int:
    """How many leading rows a sequence of L splits off: L mod TILE, if it has whole tiles after them."""
    return L % TILE if L > TILE else 0


def use_split(q_BHLK: torch.Tensor) -> bool:
    """``ENABLED``, autograd on (training), 1 to MAX_PREFIX leading rows to split off, and SDPA's kernels with a
    log-sum-exp for the device and dtype (CUDA half precision, or the CPU)."""
    P = prefix_rows(q_BHLK.shape[2])
    device_ok = (q_BHLK.dtype in (torch.float16, torch.bfloat16)) if q_BHLK.is_cuda else q_BHLK.device.type == "cpu"
    return ENABLED and torch.is_grad_enabled() and 0 < P <= MAX_PREFIX and device_ok


def attend(q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(K)) v over all L keys, (B, H, L, K), with the leading ``prefix`` rows (default
    ``prefix_rows(L)``) split off as the module docstring says."""
    P = prefix_rows(q_BHLK.shape[2]) if prefix is None else prefix
    q_P, q_N = q_BHLK[:, :, :P], q_BHLK[:, :, P:]
    k_P, k_N = k_BHLK[:, :, :P], k_BHLK[:, :, P:]
    v_P, v_N = v_BHLK[:, :, :P], v_BHLK[:, :, P:]
    out_N = RowsWithPrefixKeys.apply(q_N, k_N, v_N, k_P, v_P)
    out_P = F.scaled_dot_product_attention(q_P, k_BHLK, v_BHLK)
    return torch.cat([out_P, out_N.to(out_P.dtype)], dim=2)


def _sdpa_forward(q, k, v, scale, backend):
    """SDPA's kernel with its log-sum-exp -> (out, lse as (B, H, N), the tensors and the ints its backward takes
    back: (lse, cum_q, cum_k, seed, offset), (max_q, max_k))."""
    B, H, N, _ = q.shape
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse, (lse,), ()
    if backend == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)
    else:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
    return out, lse.reshape(B, H, N), (lse, cum_q, cum_k, seed, offset), (max_q, max_k)


def _sdpa_backward(grad, q, k, v, out, tensors, ints, scale, backend):
    """SDPA's backward kernel for ``_sdpa_forward``'s call -> (dq, dk, dv)."""
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, tensors[0],
                                                                                   0.0, False, scale=scale)
    (lse, cum_q, cum_k, seed, offset), (max_q, max_k) = tensors, ints
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(grad, q, k, v, out, lse, cum_q, cum_k,
                                                                           max_q, max_k, 0.0, False, seed, offset,
                                                                           scale=scale)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(grad, q, k, v, out, lse, seed, offset, None,
                                                                       cum_q, cum_k, max_q, max_k, 0.0, False,
                                                                       scale=scale)


def _dot(x, y, dim):
    """sum(x * y) over ``dim``, broadcast: the merge's products with the P keys (P is a few), written as
    elementwise products and sums so inductor fuses them into its passes; as matmuls they were batched
    (N x K) @ (K x P) products with P = 1 (split compiled 5.2 ms a masked-L layer vs 2.5 unsplit, A64)."""
    return (x * y).sum(dim)


class RowsWithPrefixKeys(torch.autograd.Function):
    """The N rows' attention over the N keys (SDPA) and the P prefix keys (merged through the log-sum-exp).
    Shapes: q, k, v, out (B, H, N, K); k_P, v_P (B, H, P, K); s, a_P (B, H, N, P); a_N, lse (B, H, N, 1)."""

    @staticmethod
    def forward(ctx, q, k, v, k_P, v_P):
        scale = 1.0 / math.sqrt(q.shape[-1])
        acc = torch.promote_types(q.dtype, torch.float32)        # the merge's arithmetic: float32, or float64
        out_N, lse_N, saved, ints = _sdpa_forward(q, k, v, scale, BACKEND)
        q_, k_P_, v_P_ = q.to(acc)[:, :, :, None], k_P.to(acc)[:, :, None], v_P.to(acc)[:, :, None]
        s = _dot(q_, k_P_, -1) * scale                                        # (B, H, N, P)
        lse_N = lse_N.to(acc)[..., None]
        lse = torch.logaddexp(lse_N, s.logsumexp(-1, keepdim=True))
        a_N, a_P = torch.exp(lse_N - lse), torch.exp(s - lse)      # the N keys' share, each P key's
        merged = a_N * out_N.to(acc) + _dot(a_P[..., None], v_P_, -2)
        out = torch.empty_like(out_N).copy_(merged)        # in SDPA's output layout: its backward reads it as out
        ctx.scale, ctx.acc, ctx.ints, ctx.backend = scale, acc, ints, BACKEND
        ctx.save_for_backward(q, k, v, k_P, v_P, out, a_N, a_P, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, k_P, v_P, out, a_N, a_P, *saved = ctx.saved_tensors
        scale, acc = ctx.scale, ctx.acc
        g = grad.to(acc)
        grad_N = torch.empty_like(out).copy_(a_N * g)
        dq, dk, dv = _sdpa_backward(grad_N, q, k, v, out, saved, ctx.ints, scale, ctx.backend)
        D = (g * out.to(acc)).sum(-1, keepdim=True)
        dS = a_P * (_dot(g[:, :, :, None], v_P.to(acc)[:, :, None], -1) - D)           # (B, H, N, P)
        dq = (dq.to(acc) + _dot(dS[..., None], k_P.to(acc)[:, :, None], -2) * scale).to(q.dtype)
        dk_P = (_dot(dS[..., None], q.to(acc)[:, :, :, None], 2) * scale).to(k_P.dtype)
        dv_P = _dot(a_P[..., None], g[:, :, :, None], 2).to(v_P.dtype)
        return dq, dk, dv, dk_P, dv_P
