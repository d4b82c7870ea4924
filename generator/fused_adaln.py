"""adaLN's residual add and modulated RMSNorm as one Triton op with its backward, for training (VAR; NOTES A61).

Between two sublayers of adaLN blocks the float32 residual stream x takes the sublayer's output y (bf16 under
autocast) through a per-image gate, and the next sublayer reads it RMS-normalised and modulated per image:

    x_out = x + gate * y                                  (none at the first block: x_out = x)
    h     = rms_norm(x_out) * w * (1 + scale) + shift     (h in the next Linear's compute dtype)

with gate, scale and shift (B, D) rows of the block's adaLN output, w the norm's weight (D,). The backward
takes dx_out (the residual path's gradient of x_out) and dh, and with n = x_out * rstd, g = dh (1 + scale) w:

    dx     = dx_out + rstd (g - n mean(g n))              (the gradient of x: of x_out, passed on)
    dy     = gate * dx
    dgate  = sum_L dx * y,   dscale = w sum_L dh n,   dshift = sum_L dh,   dw = sum_B,L dh (1 + scale) n

Why a kernel (the prediction in NOTES A61): compiled, the backward of each such pair ran three kernels that each
read the float32 residual rows: the norm's backward along each row (dx, dy), and two reductions along the
sequence (dscale and dshift from dh and x_out; dgate from dx and y), which inductor cannot fuse with a reduction
along the other axis. Here one program holds a run of one image's rows: it computes dx and dy row by row and adds
each row into its column sums, so the rows are read once (VAR-d16 at batch 128: 14 -> 9 row-sized tensors moved
per pair, ~0.3 ms less per pair at 3 TB/s, 32 pairs a step). Each program writes its column sums to a small
(B, G, D) buffer, summed over G (and B for dw) by torch; the forward stores each row's rstd for the backward.
Measured (H100, batch 128): the step 310.6 -> 301.8 ms, 48.3% -> 49.7% MFU. Where x_out feeds nothing but the norm
(the final one), autograd hands the backward a zero dx_out (materialized grads), which it reads: ~0.1 ms a step.

``Transformer`` runs every adaLN pair through ``adaln_norm`` where ``use_kernel`` holds: CUDA (or Triton's CPU
interpreter), autograd on (training: the sampler's outputs stay those of its compiled torch ops), ``ENABLED``.
"""
from __future__ import annotations

import os

import torch

from generator.launch import INTERPRETED, env_launch_config, int32_offsets, on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only installs: the torch-ops path
    triton = None

# TESSERA_FUSED_ADALN=0 turns it off (the torch ops, compiled by inductor)
ENABLED = os.environ.get("TESSERA_FUSED_ADALN", "1") != "0"
MAX_WIDTH = 8192            # one row of x is one block of the kernels (BLOCK_D = D rounded up to a power of two)


# the forward's (rows a program, warps) and the backward's (rows a step, rows a program, warps): the fastest of
# benchmarks/adaln_norm.py's sweep on an H100 at VAR-d16's batch 128 (run 8cc4d0c7f304; NOTES A61)
FORWARD = env_launch_config("TESSERA_ADALN_FORWARD", (4, 4))
BACKWARD = env_launch_config("TESSERA_ADALN_BACKWARD", (2, 32, 4))


def use_kernel(x: torch.Tensor) -> bool:
    """``ENABLED``, Triton present, x on CUDA (or the interpreter on the CPU), autograd on, a width the kernels
    hold, and int32 element offsets."""
    return (ENABLED and triton is not None and (x.is_cuda or INTERPRETED) and torch.is_grad_enabled()
            and x.dim() == 3 and 0 < x.shape[-1] <= MAX_WIDTH and int32_offsets(x))


def adaln_norm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
               y: torch.Tensor | None = None, gate: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, D), weight (D,), scale / shift / gate (B, 1, D) or (B, D), y (B, L, D) -> (x_out, h): x_out =
    x + gate * y (x itself without y), h = rms_norm(x_out) * weight * (1 + scale) + shift in ``out_dtype``
    (default: CUDA autocast's dtype when it is on, else x's)."""
    if out_dtype is None:
        out_dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    B, L, D = x.shape
    scale, shift = scale.reshape(B, D), shift.reshape(B, D)
    if y is None:
        return x, torch.ops.tessera.adaln_norm(x, weight, scale, shift, eps, out_dtype)[0]
    x_out, h, _ = torch.ops.tessera.adaln_residual_norm(x, y, gate.reshape(B, D), weight, scale, shift, eps, out_dtype)
    return x_out, h


def reference(x, weight, scale, shift, eps, y=None, gate=None, out_dtype=None):
    """The same in torch ops (float32 arithmetic), the kernels' test oracle."""
    B, L, D = x.shape
    xf = x.float()
    if y is not None:
        xf = xf + gate.reshape(B, 1, D).float() * y.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = n * weight.float() * (1 + scale.reshape(B, 1, D).float()) + shift.reshape(B, 1, D).float()
    return xf.to(x.dtype), h.to(out_dtype or x.dtype)


if triton is not None:
    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, gate_ptr, w_ptr, scale_ptr, shift_ptr, xo_ptr, h_ptr, rstd_ptr, n_rows, L, D,
                        gate_stride, scale_stride, shift_stride, eps,
                        HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        m = (rows < n_rows)[:, None] & cmask[None, :]
        b = rows // L
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + b[:, None] * gate_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
            x = x + gate * y
            tl.store(xo_ptr + offs, x.to(xo_ptr.dtype.element_ty), mask=m)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b[:, None] * scale_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b[:, None] * shift_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        h = x * rstd[:, None] * w[None, :] * (1.0 + scale) + shift
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _backward_kernel(dxo_ptr, dh_ptr, xo_ptr, rstd_ptr, y_ptr, gate_ptr, w_ptr, scale_ptr, dx_ptr, dy_ptr,
                         part_gate_ptr, part_norm_ptr, part_shift_ptr, L, D, rows_per_group, G,
                         gate_stride, scale_stride,
                         HAS_RES: tl.constexpr, HAS_DXO: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (b, g): rows [g R, (g + 1) R) of image b (R = rows_per_group), ROWS at a time; its column sums
        go to part_*[b, g]: sum dx y (dgate), sum dh n (dscale / w and, times 1 + scale, dw's share), sum dh. The
        sums stay (ROWS, BLOCK_D) in registers until the end (one reduction across rows, not one a step); rstd comes
        from the forward, so a row takes one sum across its columns (g x_out)."""
        b = tl.program_id(0)
        grp = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        one_scale = 1.0 + tl.load(scale_ptr + b * scale_stride + cols, mask=cmask, other=0.0).to(tl.float32)
        gw = (one_scale * w)[None, :]
        if HAS_RES:
            gate = tl.load(gate_ptr + b * gate_stride + cols, mask=cmask, other=0.0).to(tl.float32)
        sum_gate = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        sum_norm = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        sum_shift = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        start = grp * rows_per_group
        end = tl.minimum(start + rows_per_group, L)
        for r0 in range(start, end, ROWS):
            ls = r0 + tl.arange(0, ROWS)
            m = (ls < end)[:, None] & cmask[None, :]
            offs = (b * L + ls)[:, None] * D + cols[None, :]
            dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
            xo = tl.load(xo_ptr + offs, mask=m, other=0.0).to(tl.float32)
            g = dh * gw
            rstd = tl.load(rstd_ptr + b * L + ls, mask=ls < end, other=0.0)
            g_n = tl.sum(g * xo, axis=1) * rstd / D                 # mean(g n)
            n = xo * rstd[:, None]
            dx = rstd[:, None] * (g - n * g_n[:, None])
            if HAS_DXO:
                dx += tl.load(dxo_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            sum_norm += dh * n
            sum_shift += dh
            if HAS_RES:
                y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
                sum_gate += dx * y
                tl.store(dy_ptr + offs, (gate[None, :] * dx).to(dy_ptr.dtype.element_ty), mask=m)
        part = (b * G + grp) * D + cols
        tl.store(part_norm_ptr + part, tl.sum(sum_norm, axis=0), mask=cmask)
        tl.store(part_shift_ptr + part, tl.sum(sum_shift, axis=0), mask=cmask)
        if HAS_RES:
            tl.store(part_gate_ptr + part, tl.sum(sum_gate, axis=0), mask=cmask)

    def _forward(x, y, gate, weight, scale, shift, eps, out_dtype, config=None):
        """-> x_out (x itself without y), h, rstd (B L,) float32. ``config``: (rows a program, warps), default
        ``FORWARD``."""
        B, L, D = x.shape
        x = x.contiguous()
        has_res = y is not None
        y = y.contiguous() if has_res else x
        gate = gate if has_res else scale
        gate, scale, shift = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, scale, shift))
        x_out = torch.empty_like(x) if has_res else x
        h = torch.empty(B, L, D, dtype=out_dtype, device=x.device)
        rstd = torch.empty(B * L, dtype=torch.float32, device=x.device)
        rows, warps = config or FORWARD
        with on_device(x):
            _forward_kernel[(triton.cdiv(B * L, rows),)](
                x, y, gate, weight.contiguous(), scale, shift, x_out, h, rstd, B * L, L, D, gate.stride(0),
                scale.stride(0), shift.stride(0), eps, HAS_RES=has_res, ROWS=rows, BLOCK_D=triton.next_power_of_2(D),
                num_warps=1 if INTERPRETED else warps)
        return x_out, h, rstd

    def _groups(L: int, rows: int, per_program: int) -> tuple[int, int]:
        """(G, rows per group) for an image of L rows: groups of ``per_program`` rows rounded up to whole steps of
        ``rows``, the last one ragged."""
        per_group = triton.cdiv(min(per_program, L), rows) * rows
        return triton.cdiv(L, per_group), per_group

    def _backward(dx_out, dh, x_out, rstd, y, gate, weight, scale, config=None):
        """-> dx, dy, dgate (B, D), dweight (D,), dscale (B, D), dshift (B, D); dy and dgate None without y.
        ``config``: (rows a step, rows a program, warps), default ``BACKWARD``."""
        B, L, D = x_out.shape
        has_res, has_dxo = y is not None, dx_out is not None
        x_out, dh = x_out.contiguous(), dh.contiguous()        # the first norm's saved x is the caller's tensor
        dx_out = dx_out.contiguous() if has_dxo else dh
        y = y.contiguous() if has_res else dh
        gate = gate if has_res else scale
        gate, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, scale))
        dx = torch.empty_like(x_out)
        dy = torch.empty_like(y) if has_res else dx
        step, per_program, warps = config or BACKWARD
        G, per_group = _groups(L, step, per_program)
        parts = torch.empty(3, B, G, D, dtype=torch.float32, device=x_out.device)
        with on_device(x_out):
            _backward_kernel[(B, G)](
                dx_out, dh, x_out, rstd, y, gate, weight.contiguous(), scale, dx, dy, parts[0], parts[1], parts[2],
                L, D, per_group, G, gate.stride(0), scale.stride(0), HAS_RES=has_res, HAS_DXO=has_dxo, ROWS=step,
                BLOCK_D=triton.next_power_of_2(D), num_warps=1 if INTERPRETED else warps)
        sums = parts.sum(2)                                     # (3, B, D): dx y, dh n, dh
        dweight = (sums[1] * (1 + scale.float())).sum(0).to(weight.dtype)
        dscale = (sums[1] * weight.float()).to(scale.dtype)
        dshift = sums[2].to(scale.dtype, copy=True)                # copies: an op's outputs may not share memory
        dgate = sums[0].to(gate.dtype, copy=True) if has_res else None
        return dx, (dy if has_res else None), dgate, dweight, dscale, dshift

    # ---- the ops: forward, backward, autograd --------------------------------------------------------------------
    @torch.library.custom_op("tessera::adaln_norm", mutates_args=())
    def _norm_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(x, None, None, weight, scale, shift, eps, out_dtype)[1:]

    @_norm_op.register_fake
    def _(x, weight, scale, shift, eps, out_dtype):
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)

    @torch.library.custom_op("tessera::adaln_residual_norm", mutates_args=())
    def _residual_norm_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                          scale: torch.Tensor, shift: torch.Tensor, eps: float,
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, y, gate, weight, scale, shift, eps, out_dtype)

    @_residual_norm_op.register_fake
    def _(x, y, gate, weight, scale, shift, eps, out_dtype):
        return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=out_dtype),
                x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32))

    @torch.library.custom_op("tessera::adaln_norm_backward", mutates_args=())
    def _backward_op(dx_out: torch.Tensor | None, dh: torch.Tensor, x_out: torch.Tensor, rstd: torch.Tensor,
                     y: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor,
                     scale: torch.Tensor) -> list[torch.Tensor]:
        dx, dy, dgate, dweight, dscale, dshift = _backward(dx_out, dh, x_out, rstd, y, gate, weight, scale)
        if y is None:      # custom ops return tensors: empty stand-ins where there is no residual branch
            dy, dgate = dx.new_empty(0), dx.new_empty(0)
        return [dx, dy, dgate, dweight, dscale, dshift]

    @_backward_op.register_fake
    def _(dx_out, dh, x_out, rstd, y, gate, weight, scale):
        B, L, D = x_out.shape
        res = y is not None
        return [torch.empty_like(x_out, memory_format=torch.contiguous_format),
                torch.empty_like(y, memory_format=torch.contiguous_format) if res else x_out.new_empty(0),
                gate.new_empty(B, D) if res else x_out.new_empty(0), weight.new_empty(D), scale.new_empty(B, D),
                scale.new_empty(B, D)]

    def _save_norm(ctx, inputs, output):
        x, weight, scale, shift, eps, out_dtype = inputs
        ctx.save_for_backward(x, output[1], weight, scale)

    def _norm_grad(ctx, dh, _drstd):
        x, rstd, weight, scale = ctx.saved_tensors
        dx, _, _, dweight, dscale, dshift = torch.ops.tessera.adaln_norm_backward(None, dh, x, rstd, None, None,
                                                                                 weight, scale)
        return dx, dweight, dscale, dshift, None, None

    def _save_residual_norm(ctx, inputs, output):
        x, y, gate, weight, scale, shift, eps, out_dtype = inputs
        ctx.save_for_backward(output[0], output[2], y, gate, weight, scale)

    def _residual_norm_grad(ctx, dx_out, dh, _drstd):
        x_out, rstd, y, gate, weight, scale = ctx.saved_tensors
        dx, dy, dgate, dweight, dscale, dshift = torch.ops.tessera.adaln_norm_backward(
            dx_out, dh, x_out, rstd, y, gate, weight, scale)
        return dx, dy, dgate, dweight, dscale, dshift, None, None

    torch.library.register_autograd("tessera::adaln_norm", _norm_grad, setup_context=_save_norm)
    torch.library.register_autograd("tessera::adaln_residual_norm", _residual_norm_grad,
                                    setup_context=_save_residual_norm)
