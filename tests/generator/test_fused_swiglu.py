"""gate_up matmul + silu(gate) * up in one kernel (generator/fused_swiglu.py), against the torch formula
and ``transformer.SwiGLU``'s torch path. The kernel runs on CUDA, or on Triton's CPU interpreter with
TRITON_INTERPRET=1 set before the import (there in float16: the interpreter's bfloat16 matmuls are wrong)."""
import pytest
import torch
import torch.nn.functional as F

from generator import fused_swiglu as fs
from generator.transformer import SwiGLU
from tests.kernels import INTERPRETED, KERNEL_DEVICE, KERNEL_DTYPE, compile_for_hopper, needs_compiler, needs_kernel

DTYPE = KERNEL_DTYPE
EPS = torch.finfo(DTYPE).eps          # the spacing of the dtype's values relative to their size (at most)


def formula(x_MD: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The torch path as compiled: the matmul rounded to the dtype, then silu(g) u in float32, rounded once."""
    gate, up = F.linear(x_MD, weight).float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x_MD.dtype)


def inputs(M: int, D: int, Hd: int, integers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, D) and a gate_up weight (2 Hd, D) at unit-scale products; ``integers``: x in {-2..2}, weight in
    {-2..2}/16, so every product and sum is exact in float32 and in the dtype (only silu's rounding is left)."""
    if integers:
        x, w = torch.randint(-2, 3, (M, D)).float(), torch.randint(-2, 3, (2 * Hd, D)) / 16
    else:
        x, w = torch.randn(M, D), torch.randn(2 * Hd, D) / D ** 0.5
    return x.to(KERNEL_DEVICE, DTYPE), w.to(KERNEL_DEVICE, DTYPE)


@needs_kernel
@pytest.mark.parametrize("M, D, Hd", [
    (7, 32, 48),        # fewer rows than a tile; Hd and D below one tile
    (130, 80, 96),      # a ragged second row tile; K = 80: one full 64-wide K step, one partial
    (257, 64, 128),     # masked-B's rows per sequence, one exact tile of hidden columns
    (300, 192, 160),    # three K steps; two column tiles, the second partly filled
])
def test_kernel_equals_the_torch_formula(M, D, Hd):
    """Exact products (integer inputs): equal to the formula but for a rare tie that silu's float32 ulp
    rounds the other way (at most one rounding of the dtype). Random inputs: the kernel's float32 sums run
    in another order than the matmul's, so a few g or u round to the neighbouring value; silu amplifies that
    by a few ulps at negative g."""
    x, w = inputs(M, D, Hd, integers=True)
    with torch.no_grad():
        out, ref = fs.fused_swiglu(x, w), formula(x, w)
    assert out.shape == (M, Hd) and out.dtype == DTYPE
    torch.testing.assert_close(out, ref, rtol=EPS, atol=0)
    assert (out != ref).float().mean() < 1e-3
    x, w = inputs(M, D, Hd)
    with torch.no_grad():
        out, ref = fs.fused_swiglu(x, w), formula(x, w)
    torch.testing.assert_close(out, ref, rtol=8 * EPS, atol=1e-3)
    assert (out == ref).float().mean() > 0.98


@needs_kernel
def test_kernel_equals_the_float64_formula():
    """silu(x Wg^T) * (x Wu^T) in float64 from the same rounded inputs, to the dtype's rounding."""
    x, w = inputs(200, 96, 112)
    with torch.no_grad():
        out = fs.fused_swiglu(x, w).double()
    gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
    exact = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(out, exact, atol=4 * EPS, rtol=4 * EPS)
    assert (out - exact).abs().mean() < EPS * exact.abs().mean()


@needs_kernel
def test_kernel_reads_strided_rows_and_leading_dims():
    """x as a slice of wider rows (row stride 2 D) and with two leading dims gives the same as its copy, and
    zeroing one gate row or one up row of the weight changes that hidden column only."""
    x, w = inputs(2 * 35, 2 * 48, 40)
    x_BLD = x.view(2, 35, 96)[..., :48]                     # (2, 35, 48), row stride 96
    w = w[:, :48].contiguous()
    with torch.no_grad():
        out = fs.fused_swiglu(x_BLD, w)
        assert out.shape == (2, 35, 40)
        assert torch.equal(out, fs.fused_swiglu(x_BLD.contiguous(), w))
        assert torch.equal(out.view(70, 40), fs.fused_swiglu(x_BLD.reshape(70, 48), w))
        for row in (3, 40 + 3):                             # gate column 3, then up column 3
            moved = w.clone()
            moved[row] = 0.0
            changed = (fs.fused_swiglu(x_BLD, moved) != out).flatten(0, 1).any(0)
            assert changed[3] and changed.sum() == 1


@needs_kernel
@pytest.mark.parametrize("BM, BN, BK, GROUP_M", [(16, 16, 16, 2), (32, 16, 32, 3), (16, 32, 64, 1)])
def test_every_tile_is_computed_once_whatever_the_tiles(BM, BN, BK, GROUP_M):
    """The kernel called directly with small tiles: 5-8 row tiles x 2-3 column tiles, the GROUP_M swizzle
    with a last, smaller group, K both a multiple of BK and not; out starts as NaN, so a missed tile shows."""
    M, Hd = 120, 40
    for D in (64, 48):
        x, w = inputs(M, D, Hd, integers=True)
        out = torch.full((M, Hd), float("nan"), dtype=DTYPE, device=KERNEL_DEVICE)
        fs._fused_swiglu_kernel[fs.grid(M, Hd, BM, BN)](x, w, out, M, Hd, D, x.stride(0), out.stride(0),
                                                         fs.m_bucket(M), BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M,
                                                         EVEN_K=D % BK == 0)
        torch.testing.assert_close(out, formula(x, w), rtol=EPS, atol=0)


def interpreter_has_descriptors() -> bool:
    """Whether Triton's CPU interpreter emulates tensor descriptors (3.8's does: create_make_tensor_descriptor)."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        return False
    return hasattr(InterpreterBuilder, "create_make_tensor_descriptor")


@needs_kernel
@pytest.mark.skipif(not fs.HAS_TMA, reason="this Triton has no device-side descriptors (tl.make_tensor_descriptor)")
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("BM, BN, BK, GROUP_M", [(16, 16, 16, 2), (32, 16, 32, 3), (16, 32, 64, 1)])
def test_tma_main_loop_computes_every_tile_once(BM, BN, BK, GROUP_M, persistent):
    """The TMA branch called directly with small tiles (the autotuner never gives it to the interpreter): the
    descriptors' zero fill past K (D 48 is not a multiple of BK 32 or 64) and past M, N (ragged last tiles), the
    clipped descriptor store, Wu's descriptor starting N rows into the weight, and (persistent) 5 programs
    looping over all 16-24 tiles; out starts as NaN, so a missed tile shows. Equal to the formula as the
    tl.load loop is (exact products)."""
    if KERNEL_DEVICE == "cpu" and not interpreter_has_descriptors():
        pytest.skip(f"Triton {fs.triton.__version__}'s interpreter has no tensor descriptors")
    if KERNEL_DEVICE == "cuda":
        fs._ensure_allocator()          # the descriptors' scratch (the op does this itself)
    M, Hd = 120, 40
    for D in (64, 48):
        x, w = inputs(M, D, Hd, integers=True)
        out = torch.full((M, Hd), float("nan"), dtype=DTYPE, device=KERNEL_DEVICE)
        fs._fused_swiglu_kernel[fs.grid(M, Hd, BM, BN, persistent, 5)](
            x, w, out, M, Hd, D, x.stride(0), out.stride(0), fs.m_bucket(M), BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M,
            EVEN_K=D % BK == 0, TMA=True, PERSISTENT=persistent)
        torch.testing.assert_close(out, formula(x, w), rtol=EPS, atol=0)


@needs_kernel
def test_custom_op_registration_and_fullgraph_compile():
    """``torch.library.opcheck`` (schema, fake tensor, dispatch) and a fullgraph torch.compile around the op."""
    x, w = inputs(20, 32, 16)
    torch.library.opcheck(torch.ops.tessera.fused_swiglu.default, (x, w))
    compiled = torch.compile(lambda x: fs.fused_swiglu(x, w) * 2, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x.view(4, 5, 32)), fs.fused_swiglu(x, w).view(4, 5, 16) * 2)


@pytest.mark.skipif(fs.triton is None, reason="needs Triton")
def test_tma_configs_are_candidates_only_where_they_can_run(monkeypatch):
    """The autotuner holds the TMA configs (where Triton has descriptors; not on the interpreter, which runs
    CONFIGS[0]) and prunes them unless N and K are multiples of 8 (16-byte rows) on a sm_90+ GPU; a persistent
    config launches at most one program per SM."""
    tma = [c for c in fs._tuned_kernel.configs if c.kwargs["TMA"]]
    if INTERPRETED:
        assert len(fs._tuned_kernel.configs) == 1 and not tma
    else:
        assert len(fs._tuned_kernel.configs) == len(fs.CONFIGS) + len(fs.TMA_CONFIGS)
        assert len(tma) == len(fs.TMA_CONFIGS)
    assert bool(fs.TMA_CONFIGS) == fs.HAS_TMA and all(len(c) == 7 for c in fs.TMA_CONFIGS)
    configs = [fs.triton.Config(dict(BM=128, BN=128, BK=64, GROUP_M=8, TMA=t, PERSISTENT=False)) for t in (0, 1)]
    monkeypatch.setattr(fs.torch.cuda, "is_available", lambda: True)
    for capability, N, K, ok in [((9, 0), 2048, 768, fs.HAS_TMA), ((9, 0), 2048, 20, False),
                                 ((9, 0), 20, 768, False), ((8, 0), 2048, 768, False), ((10, 0), 24, 40, fs.HAS_TMA)]:
        monkeypatch.setattr(fs.torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert fs.tma_ok(N, K) == ok
        assert fs._prune(configs, dict(N=N, K=K)) == (configs if ok else configs[:1])
    assert fs.grid(32896, 2048, 128, 128) == (257 * 16,)
    assert fs.grid(32896, 2048, 128, 128, True, 132) == (132,) and fs.grid(514, 2048, 128, 128, True, 132) == (80,)


@pytest.mark.skipif(fs.triton is None, reason="needs Triton")
def test_tma_operands_are_16_byte_aligned_and_the_allocator_is_kept():
    """``_tma_aligned`` passes aligned rows through and copies misaligned ones (a start 2 bytes in, a row stride
    of 20 bytes); ``_ensure_allocator`` sets the scratch allocator where none is, and keeps one that is set."""
    import contextvars
    t = torch.zeros(4, 64, dtype=torch.float16)
    assert fs._tma_aligned(t) is t and fs._tma_aligned(t[:, :48]).data_ptr() == t.data_ptr()
    for bad in (t.view(-1)[1:65 * 3 + 1].view(3, 65)[:, :64], t.view(-1)[:200].view(20, 10)[:, :8]):
        fixed = fs._tma_aligned(bad)
        assert torch.equal(fixed, bad) and fixed.data_ptr() % 16 == 0 and fixed.stride(0) * 2 % 16 == 0
    from triton.runtime import _allocation

    def check():
        _allocation._allocator.set(_allocation.NullAllocator())
        fs._ensure_allocator()
        assert _allocation._allocator.get() is fs._scratch
        mine = lambda size, align, stream: None     # noqa: E731
        fs.triton.set_allocator(mine)
        fs._ensure_allocator()
        assert _allocation._allocator.get() is mine
    contextvars.copy_context().run(check)           # the allocator is a ContextVar: the test's setting stays here


def test_m_bucket_is_the_next_power_of_two():
    assert [fs.m_bucket(m) for m in (1, 2, 7, 16, 514, 32896)] == [1, 2, 8, 16, 1024, 65536]


def test_swiglu_takes_the_kernel_only_when_enabled_for_no_grad_cuda_half_weights(monkeypatch):
    mlp = SwiGLU(32, 48)
    x = torch.randn(2, 5, 32)
    monkeypatch.setattr(fs, "ENABLED", True)
    with torch.no_grad():
        assert not fs.use_kernel(x.half(), mlp.gate_up.weight.half())              # CPU
        monkeypatch.setattr("generator.transformer.fused_swiglu", lambda *a: pytest.fail("took the kernel"))
        expected = mlp.down(F.silu(F.linear(x, mlp.gate_up.weight[:48])) * F.linear(x, mlp.gate_up.weight[48:]))
        torch.testing.assert_close(mlp(x), expected)                               # the torch path on the CPU
    monkeypatch.undo()
    if not (torch.cuda.is_available() and fs.triton is not None):
        return
    monkeypatch.setattr(fs, "ENABLED", True)
    xc, wc = x.cuda().to(torch.bfloat16), mlp.gate_up.weight.cuda().to(torch.bfloat16)
    with torch.no_grad():
        assert fs.use_kernel(xc, wc)
        assert not fs.use_kernel(xc.float(), wc.float())                          # float32 weights
        assert not fs.use_kernel(xc.float(), wc)                                  # x's dtype differs, no autocast
        assert not fs.use_kernel(xc, wc.T.contiguous().T)                         # a non-contiguous weight
        assert not fs.use_kernel(xc[..., :24], wc[:, :24].contiguous())          # D = 24: not a multiple of 16
        assert not fs.use_kernel(xc, wc[:40])                                     # Hd = 20
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert fs.use_kernel(xc.float(), wc)                                  # autocast casts x to bf16
            assert not fs.use_kernel(xc.float(), wc.half())                       # but not to fp16
    assert not fs.use_kernel(xc, wc)                                              # autograd on
    monkeypatch.setattr(fs, "ENABLED", False)
    with torch.no_grad():
        assert not fs.use_kernel(xc, wc)                                          # not opted in


@pytest.mark.gpu
def test_gpu_swiglu_module_dispatch_matches_the_torch_path(monkeypatch):
    """SwiGLU.forward under no_grad on CUDA, opted in (the kernel), agrees with the same call under autograd
    (cuBLAS, then eager silu * up with its extra rounding of silu(g)), in bf16 and under bf16 autocast with
    float32 activations; and inside torch.compile(fullgraph=True)."""
    monkeypatch.setattr(fs, "ENABLED", True)
    mlp = SwiGLU(256, 688).cuda().to(torch.bfloat16)
    x = torch.randn(3, 257, 256, device="cuda")
    calls = []
    real = fs.fused_swiglu
    monkeypatch.setattr("generator.transformer.fused_swiglu", lambda *a: calls.append(1) or real(*a))
    ref = mlp(x.to(torch.bfloat16)).detach()
    with torch.no_grad():
        fused = mlp(x.to(torch.bfloat16))
        assert len(calls) == 1
        torch.testing.assert_close(fused, ref, atol=2e-2, rtol=2e-2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(mlp(x), fused) and len(calls) == 2
        monkeypatch.setattr("generator.transformer.fused_swiglu", real)
        compiled = torch.compile(mlp, fullgraph=True)
        torch.testing.assert_close(compiled(x.to(torch.bfloat16)), fused, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_every_config_and_the_op_in_a_cuda_graph():
    """On the GPU: every config, the tl.load ones and the TMA ones (persistent or not), launched directly at a
    ragged shape (M 1000, Hd 200, D 72: partial row, column and K tiles) equals the formula but for rare silu
    ties; and the autotuned op (whatever it picked) replays from a CUDA graph, its descriptors' scratch taken
    from the graph's memory, giving the same output for new inputs copied into the captured ones."""
    torch.manual_seed(0)
    M, D, Hd = 1000, 72, 200
    x, w = inputs(M, D, Hd, integers=True)
    ref = formula(x, w)
    fs._ensure_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tma_ok = fs.tma_ok(Hd, D)
    for bm, bn, bk, warps, stages, group_m, *rest in fs.CONFIGS + (fs.TMA_CONFIGS if tma_ok else []):
        persistent = bool(rest and rest[0])
        out = torch.full((M, Hd), float("nan"), dtype=DTYPE, device="cuda")
        fs._fused_swiglu_kernel[fs.grid(M, Hd, bm, bn, persistent, sms)](
            x, w, out, M, Hd, D, x.stride(0), out.stride(0), fs.m_bucket(M), BM=bm, BN=bn, BK=bk, GROUP_M=group_m,
            EVEN_K=D % bk == 0, TMA=bool(rest), PERSISTENT=persistent, num_warps=warps, num_stages=stages)
        torch.testing.assert_close(out, ref, rtol=EPS, atol=0, msg=f"config {(bm, bn, bk, warps, stages, rest)}")
    with torch.no_grad():
        first = fs.fused_swiglu(x, w)                        # autotunes outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fs.fused_swiglu(x, w)
        x2, _ = inputs(M, D, Hd, integers=True)
        x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, fs.fused_swiglu(x2, w)) and not torch.equal(captured, first)


@needs_compiler
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled on the CPU (a GPU runs the kernel itself)")
@pytest.mark.parametrize("config, even_k", [(c + (None,), True) for c in fs.CONFIGS]
                         + [(fs.CONFIGS[0] + (None,), False)] + [(c, True) for c in fs.TMA_CONFIGS])
def test_every_config_compiles_for_hopper_pipelined_within_shared_memory(config, even_k):
    """Triton's compiler, down to sm_90 PTX and cubin, with no GPU, given the hints the JIT gives at masked-B's
    shape (pointers and M, N, K, strides divisible by 16): Hopper's tensor-core instructions, the loads staged
    through shared memory asynchronously (the software pipeline, at least stages - 1 buffers deep; without
    the hints it stages nothing), and the stages' shared memory under the 227 KB a block can have. The TMA
    configs (persistent = True/False; None: the tl.load loop): every load and the store a TMA bulk copy
    (cp.async.bulk.tensor, no cp.async of single threads), and their descriptors in the launch's global scratch
    (what ``triton.set_allocator``'s allocator gives)."""
    bm, bn, bk, warps, stages, group_m, persistent = config
    tma = persistent is not None
    names = ["X", "W", "O", "M", "N", "K", "s_xm", "s_om", "M_BUCKET"]
    signature = {**dict.fromkeys(names[:3], "*bf16"), **dict.fromkeys(names[3:], "i32"),
                 **dict.fromkeys(["BM", "BN", "BK", "GROUP_M", "EVEN_K", "TMA", "PERSISTENT"], "constexpr")}
    consts = dict(BM=bm, BN=bn, BK=bk, GROUP_M=group_m, EVEN_K=even_k, TMA=tma, PERSISTENT=bool(persistent))
    divisible = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
    kernel = compile_for_hopper(fs._fused_swiglu_kernel, signature, consts, divisible, num_warps=warps,
                                num_stages=stages)
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and "wgmma" in ptx
    if tma:
        assert "cp.async.bulk.tensor" in ptx and "cp.async.ca" not in ptx and "cp.async.cg" not in ptx
        assert kernel.metadata.global_scratch_size >= 4 * 128          # four 128-byte descriptors per program
    else:
        assert "cp.async" in ptx and "cp.async.bulk.tensor" not in ptx
    stage_bytes = (bm + 2 * bn) * bk * 2                  # an x tile and two weight tiles in bf16
    assert (stages - 1) * stage_bytes <= kernel.metadata.shared <= 227 * 1024
