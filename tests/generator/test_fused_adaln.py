"""adaLN's residual add + modulated RMSNorm as one op with its backward (generator/fused_adaln.py), against the
formula in torch ops and autograd through it, and the transformer's training forward with and without it. The
kernels run on CUDA, or on Triton's CPU interpreter with TRITON_INTERPRET=1 set before the import."""
import pytest
import torch

from generator import fused_adaln as fa
from generator.launch import env_launch_config
from generator.config import GeneratorConfig
from generator.transformer import Transformer, init_weights, rope_tables
from tests.kernels import (KERNEL_DEVICE, KERNEL_DTYPE, assert_compiled_grads_match, compile_for_hopper,
                           needs_compiler, needs_kernel)

EPS = 1e-6


def inputs(B, L, D, residual=True, seed=0):
    """x float32 (the residual stream); y, gate, scale, shift in the half dtype, as under autocast; the
    modulations as (B, 1, D) views of one (B, 1, 6D) tensor, as Block's chunks of its adaLN output are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g) * 3
    mods = (torch.randn(B, 1, 6 * D, generator=g) * 0.5).to(KERNEL_DTYPE)
    shift, scale, gate = mods[..., :D], mods[..., D:2 * D], mods[..., 2 * D:3 * D]
    w = 1 + torch.randn(D, generator=g) * 0.1
    y = torch.randn(B, L, D, generator=g).to(KERNEL_DTYPE) if residual else None
    to = lambda t: None if t is None else t.to(KERNEL_DEVICE)        # noqa: E731
    return to(x), to(w), to(scale), to(shift), to(y), (to(gate) if residual else None)


def reference_grads(x, w, scale, shift, y, gate, dx_out, dh):
    """Autograd through ``fa.reference`` in float64 (the formula written out): the gradients of every input."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, scale, shift, y, gate)]
    xo, h = fa.reference(*leaves[:4], EPS, leaves[4], leaves[5], out_dtype=torch.float64)
    loss = (h * dh.double()).sum() + ((xo * dx_out.double()).sum() if dx_out is not None else 0)
    loss.backward()
    return [t.grad if t is not None else None for t in leaves]


@needs_kernel
@pytest.mark.parametrize("B, L, D", [(2, 7, 32), (3, 21, 96), (1, 130, 64)])
@pytest.mark.parametrize("residual", [True, False])
def test_forward_equals_the_formula(B, L, D, residual):
    """x_out = x + gate * y in float32 (x itself without y); h = rms_norm(x_out) w (1 + scale) + shift, rounded
    once to the half dtype."""
    x, w, scale, shift, y, gate = inputs(B, L, D, residual)
    with torch.enable_grad():
        x_out, h = fa.adaln_norm(x, w, scale, shift, EPS, y, gate, out_dtype=KERNEL_DTYPE)
    ref_x, ref_h = fa.reference(x, w, scale, shift, EPS, y, gate, out_dtype=KERNEL_DTYPE)
    assert x_out.dtype == torch.float32 and h.dtype == KERNEL_DTYPE and h.shape == (B, L, D)
    torch.testing.assert_close(x_out, ref_x, rtol=1e-6, atol=1e-6)
    if not residual:
        assert x_out is x
    torch.testing.assert_close(h.float(), ref_h.float(), rtol=torch.finfo(KERNEL_DTYPE).eps, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("B, L, D", [(2, 7, 32), (3, 45, 96), (2, 130, 64)])
@pytest.mark.parametrize("residual, downstream", [(True, True), (True, False), (False, True)])
def test_backward_equals_autograd_through_the_formula(B, L, D, residual, downstream):
    """dx (with the residual path's dx_out added), dy = gate dx, and the column sums dgate, dscale, dshift, dw, each
    against float64 autograd through the formula. ``downstream`` False: x_out feeds nothing else (the final norm),
    so its gradient is None. L past ROWS x groups: several programs per image, a ragged last step."""
    x, w, scale, shift, y, gate = inputs(B, L, D, residual, seed=1)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, scale, shift, y, gate)]
    g = torch.Generator().manual_seed(2)
    dh = torch.randn(B, L, D, generator=g).to(KERNEL_DEVICE, KERNEL_DTYPE)
    dx_out = torch.randn(B, L, D, generator=g).to(KERNEL_DEVICE) if downstream and residual else None
    with torch.enable_grad():
        x_out, h = fa.adaln_norm(*leaves[:4], EPS, leaves[4], leaves[5], out_dtype=KERNEL_DTYPE)
        outs, grads = [h], [dh]
        if dx_out is not None:
            outs, grads = [h, x_out], [dh, dx_out]
        torch.autograd.backward(outs, grads)
    want = reference_grads(x, w, scale, shift, y, gate, dx_out, dh)
    names = ["x", "weight", "scale", "shift", "y", "gate"]
    for name, leaf, ref in zip(names, leaves, want):
        if leaf is None:
            continue
        got = leaf.grad
        assert got is not None and got.dtype == leaf.dtype and got.shape == leaf.shape, name
        tol = 1e-4 if leaf.dtype == torch.float32 else 2 * torch.finfo(leaf.dtype).eps
        scale_ = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * scale_, msg=lambda m: f"{name}: {m}")


@needs_kernel
def test_a_strided_input_gives_the_same_values():
    """x as a transposed view (not contiguous): the first norm's op saves the caller's x for its backward, which
    reads it as contiguous rows; the values and gradients equal those from a contiguous copy."""
    B, L, D = 2, 9, 32
    x, w, scale, shift, _, _ = inputs(B, L, D, residual=False, seed=7)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous() and torch.equal(strided, x)
    dh = torch.randn(B, L, D, generator=torch.Generator().manual_seed(8)).to(KERNEL_DEVICE, KERNEL_DTYPE)
    runs = []
    for t in (x, strided):
        leaf = t.detach().clone() if t.is_contiguous() else t.detach()
        leaf.requires_grad_()
        with torch.enable_grad():
            h = fa.adaln_norm(leaf, w, scale, shift, EPS, out_dtype=KERNEL_DTYPE)[1]
            h.backward(dh)
        runs.append((h.detach(), leaf.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@needs_kernel
def test_the_groups_cover_every_row():
    """The backward's (image, group) programs: G groups of whole steps that cover [0, L) exactly once."""
    for L, rows, per_program in [(1, 1, 16), (7, 2, 16), (680, 2, 16), (680, 4, 136), (4097, 4, 30), (21, 8, 8)]:
        G, per_group = fa._groups(L, rows, per_program)
        assert per_group % rows == 0 and (G - 1) * per_group < L <= G * per_group


@needs_kernel
@pytest.mark.parametrize("config", [(1, 1, 1), (4, 8, 4), (2, 6, 2)])
def test_every_backward_launch_gives_the_same_gradients(config):
    """Any (rows a step, rows a program, warps) computes the same dx and dy, and the column sums to float32's
    rounding of their order; any forward launch (rows a program, warps) the same x_out, h and rstd."""
    B, L, D = 2, 45, 96
    x, w, scale, shift, y, gate = inputs(B, L, D, seed=5)
    g = torch.Generator().manual_seed(6)
    dh = torch.randn(B, L, D, generator=g).to(KERNEL_DEVICE, KERNEL_DTYPE)
    dx_out = torch.randn(B, L, D, generator=g).to(KERNEL_DEVICE)
    x_out, _, rstd = fa._forward(x, y, gate.reshape(B, D), w, scale.reshape(B, D), shift.reshape(B, D), EPS,
                                 KERNEL_DTYPE)
    args = (dx_out, dh, x_out, rstd, y, gate.reshape(B, D), w, scale.reshape(B, D))
    for got, want in zip(fa._backward(*args, config=config), fa._backward(*args, config=fa.BACKWARD)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fwd = (x, y, gate.reshape(B, D), w, scale.reshape(B, D), shift.reshape(B, D), EPS, KERNEL_DTYPE)
    for got, want in zip(fa._forward(*fwd, config=config[::2]), fa._forward(*fwd, config=fa.FORWARD)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_launch_can_be_set(monkeypatch):
    """TESSERA_ADALN_BACKWARD="rows,rows,warps" (the tuning sweep's override); a bad value names the variable."""
    monkeypatch.setenv("TESSERA_ADALN_BACKWARD", "4,32,8")
    assert env_launch_config("TESSERA_ADALN_BACKWARD", (1, 64, 8)) == (4, 32, 8)
    for bad in ("3,32,8", "4,32", "4,x,8", "4,0,8"):
        monkeypatch.setenv("TESSERA_ADALN_BACKWARD", bad)
        with pytest.raises(ValueError, match="TESSERA_ADALN_BACKWARD"):
            env_launch_config("TESSERA_ADALN_BACKWARD", (1, 64, 8))
    monkeypatch.delenv("TESSERA_ADALN_BACKWARD")
    assert env_launch_config("TESSERA_ADALN_BACKWARD", (1, 64, 8)) == (1, 64, 8)


def tiny_adaln(seed=0):
    config = GeneratorConfig(kind="var", codebook_size=16, grid_size=4, scales=(1, 2, 4), codec_dim=8, num_classes=3,
                             dim=64, depth=2, heads=2, adaln=True)
    torch.manual_seed(seed)
    model = Transformer(config)
    init_weights(model, config.depth)
    for m in model.modules():            # adaLN starts at zero: give it weights, so gates and scales matter
        if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.normal_(m.bias, std=0.05)
    return model.to(KERNEL_DEVICE)


@needs_kernel
def test_transformer_training_forward_matches_the_torch_ops(monkeypatch):
    """Transformer.forward with autograd on runs the fused adaLN path; its hidden states and every parameter's
    gradient match the torch ops' path (fused_adaln.ENABLED off) to float32 rounding (no autocast here)."""
    model = tiny_adaln()
    B, L, D = 3, 21, 64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, L, D, generator=g).to(KERNEL_DEVICE)
    cond = torch.randn(B, D, generator=g).to(KERNEL_DEVICE)
    cos, sin = rope_tables(torch.arange(L), model.config.head_dim)
    cos, sin = cos.to(KERNEL_DEVICE), sin.to(KERNEL_DEVICE)
    target = torch.randn(B, L, D, generator=g).to(KERNEL_DEVICE)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(fa, "ENABLED", enabled)
        model.zero_grad(set_to_none=True)
        xi, ci = x.clone().requires_grad_(), cond.clone().requires_grad_()
        assert fa.use_kernel(xi) == enabled
        h = model(xi, cos, sin, ci)
        ((h - target) ** 2).mean().backward()
        runs.append((h.detach(), xi.grad, ci.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (h1, dx1, dc1, g1), (h0, dx0, dc0, g0) = runs
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dc1, dc0, rtol=1e-4, atol=1e-6)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@needs_kernel
def test_the_ops_trace_under_torch_compile():
    """The fake implementations and the autograd formula under AOT autograd (backend aot_eager): the compiled
    forward and backward give what the eager op does."""
    x, w, scale, shift, y, gate = inputs(2, 9, 32, seed=4)

    def fn(x, w, scale, shift, y, gate):
        x1, h = fa.adaln_norm(x, w, scale, shift, EPS, out_dtype=torch.float32)
        x2, h2 = fa.adaln_norm(x1 + h, w, scale, shift, EPS, y, gate, out_dtype=torch.float32)
        return (x2 * h2).sum()
    assert_compiled_grads_match(fn, (x, w, scale, shift, y, gate))


def test_no_kernel_without_autograd_or_when_off(monkeypatch):
    """The sampler's no-grad forwards keep the torch ops (their outputs unchanged); so does ENABLED off."""
    x = torch.randn(1, 4, 8, device=KERNEL_DEVICE or "cpu")
    with torch.no_grad():
        assert not fa.use_kernel(x)
    monkeypatch.setattr(fa, "ENABLED", False)
    assert not fa.use_kernel(x)


@needs_compiler
def test_kernels_compile_for_hopper():
    """Triton's real front end and sm_90 back end accept both kernels, with and without the residual branch."""
    fwd = {"x_ptr": "*fp32", "y_ptr": "*bf16", "gate_ptr": "*bf16", "w_ptr": "*fp32", "scale_ptr": "*bf16",
           "shift_ptr": "*bf16", "xo_ptr": "*fp32", "h_ptr": "*bf16", "rstd_ptr": "*fp32", "n_rows": "i32",
           "L": "i32", "D": "i32",
           "gate_stride": "i32", "scale_stride": "i32", "shift_stride": "i32", "eps": "fp32",
           "HAS_RES": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
    bwd = {"dxo_ptr": "*fp32", "dh_ptr": "*bf16", "xo_ptr": "*fp32", "rstd_ptr": "*fp32", "y_ptr": "*bf16", "gate_ptr": "*bf16",
           "w_ptr": "*fp32", "scale_ptr": "*bf16", "dx_ptr": "*fp32", "dy_ptr": "*bf16", "part_gate_ptr": "*fp32",
           "part_norm_ptr": "*fp32", "part_shift_ptr": "*fp32", "L": "i32", "D": "i32", "rows_per_group": "i32",
           "G": "i32", "gate_stride": "i32", "scale_stride": "i32",
           "HAS_RES": "constexpr", "HAS_DXO": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
    for res in (True, False):
        k = compile_for_hopper(fa._forward_kernel, fwd, dict(HAS_RES=res, ROWS=fa.FORWARD[0], BLOCK_D=1024),
                               num_warps=fa.FORWARD[1])
        assert k.asm["cubin"]
        k = compile_for_hopper(fa._backward_kernel, bwd, dict(HAS_RES=res, HAS_DXO=res, ROWS=fa.BACKWARD[0],
                                                              BLOCK_D=1024), num_warps=fa.BACKWARD[2])
        assert k.asm["cubin"]
