"""The few-rows Linear kernel (generator/matvec.py): which layers take it, its products against F.linear, and a
cached decoding step through it. The kernel runs on CUDA or Triton's CPU interpreter (TRITON_INTERPRET=1)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generator import matvec, transformer
from generator.autoregressive import ARGenerator
from generator.config import GeneratorConfig
from generator.launch import PDL_SUPPORTED
from tests.kernels import KERNEL_DEVICE, KERNEL_DTYPE, compile_for_hopper, needs_compiler, needs_kernel

D, HIDDEN, V = 768, 2048, 16384     # AR-B


@pytest.mark.parametrize("name, N, K, takes", [("qkv", 3 * D, D, True), ("proj", D, D, True),
                                               ("gate_up", 2 * HIDDEN, D, True), ("down", D, HIDDEN, True),
                                               ("head", V, D, False)])
def test_which_layers_take_the_kernel(name, N, K, takes):
    """AR-B's five Linear shapes: the kernel where session 25's sweep beat cuBLAS (at most ``MAX_WIDEN`` outputs per
    input: not the head), at most 8 rows, a contiguous weight; the down projection also from gate_up's output."""
    weight = torch.empty(N, K, device="meta")
    assert matvec.few_rows(torch.empty(2, 1, K, device="meta"), weight) is takes
    assert not matvec.few_rows(torch.empty(16, 1, K, device="meta"), weight)           # 16 rows: cuBLAS
    assert not matvec.few_rows(torch.empty(1, 4, K, device="meta"), weight)            # 4 tokens: not a cached step
    assert not matvec.few_rows(torch.empty(2, 1, K, device="meta"), torch.empty(K, N, device="meta").t())
    assert matvec.few_rows(torch.empty(2, 1, 2 * K, device="meta"), weight, glu=True) is takes
    assert not matvec.few_rows(torch.empty(2, 1, K, device="meta"), weight, glu=True)   # glu reads 2K per row


def test_a_dynamic_token_count_compiles_once():
    """A forward compiled with a dynamic number of tokens (VAR's scales after the first) decides ``few_rows`` without
    a guard on the count: one graph for 2 to 17 tokens (a row-count test would split it at 8 rows)."""
    from torch._dynamo.testing import CompileCounter
    weight, counter = torch.empty(96, 32), CompileCounter()
    torch._dynamo.reset()
    try:
        f = torch.compile(lambda x: x * 2 if matvec.few_rows(x, weight) else x * 3, backend=counter, dynamic=True)
        for tokens in (4, 2, 5, 9, 17):
            x = torch.randn(3, tokens, 32)
            torch.testing.assert_close(f(x), x * 3)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()
    assert matvec.few_rows(torch.empty(3, 1, 32), weight)       # one token per sequence: the kernel


@pytest.mark.parametrize("value, on", [(None, True), ("0", False)])
def test_on_by_default_off_with_the_variable(value, on):
    """TESSERA_MATVEC unset: the kernel is on (NOTES A52); "0" turns it off. Read at import (a fresh process)."""
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_MATVEC"} | ({} if value is None else
                                                                          {"TESSERA_MATVEC": value})
    out = subprocess.run([sys.executable, "-c", "from generator import matvec; print(matvec.ENABLED)"], env=env,
                         cwd=Path(__file__).parents[2], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(on)


def test_never_on_the_cpu(monkeypatch):
    monkeypatch.setattr(matvec, "ENABLED", True)
    x, w = torch.randn(2, D), torch.randn(D, D)
    assert not matvec.use_kernel(x.half(), w.half())        # CPU tensors: F.linear


@needs_kernel
@pytest.mark.parametrize("M, N, K", [(1, 96, 512), (2, 768, 768), (3, 100, 300), (8, 24, 2048)])
def test_the_kernel_is_the_linear_layer(M, N, K):
    """Every row against every output, K not a multiple of the column block, N not one of the row block, M not a
    power of two; float32 sums of half-precision products, rounded once."""
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    x, w = x.to(KERNEL_DEVICE, KERNEL_DTYPE), w.to(KERNEL_DEVICE, KERNEL_DTYPE)
    y = matvec.linear_few_rows(x, w)
    assert y.shape == (M, N) and y.dtype == KERNEL_DTYPE
    exact = x.double() @ w.double().T
    torch.testing.assert_close(y.double(), exact, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(y, F.linear(x.float(), w.float()).to(KERNEL_DTYPE), atol=2e-3, rtol=1e-2)


@needs_kernel
@pytest.mark.parametrize("cfg", [(4, 128, 2), (16, 512, 4), (2, 512, 4)])
def test_every_launch_the_benchmark_sweeps_is_the_linear(cfg):
    """Other (BLOCK_N, BLOCK_K, warps) than the shipped one (benchmarks/decode_matvec.py sweeps them), float32:
    the same sums to float32 rounding, masked edges in N and K; BLOCK_K 512 >= K = 300 is the one-pass path
    (the whole weight slab loaded before x)."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(100, 300, generator=g) * 0.02, torch.randn(2, 300, generator=g)
    y = matvec.launch(x.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), *cfg).cpu()
    torch.testing.assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5)


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformer.RMSNorm's formula, written out."""
    return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight.float()


@needs_kernel
@pytest.mark.parametrize("x_dtype", [torch.float32, KERNEL_DTYPE])
@pytest.mark.parametrize("M, N, K", [(2, 384, 128), (3, 100, 300)])
@pytest.mark.parametrize("block_k", [64, 512])
def test_the_norm_in_front_is_rmsnorm_then_the_linear(M, N, K, x_dtype, block_k):
    """With ``norm_weight``: RMSNorm's float32 formula over each row of x (a float32 or half residual stream), rounded
    to the weight's dtype (what autocast hands F.linear), then the product; several column blocks per row (the mean
    square spans them) or one pass over a masked block wider than K, N wider than K, M not a power of two."""
    g = torch.Generator().manual_seed(K)
    x, w = (torch.randn(M, K, generator=g) * 3).to(x_dtype), torch.randn(N, K, generator=g) / K ** 0.5
    norm_weight = 1 + 0.1 * torch.randn(K, generator=g)
    x, w, norm_weight = x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE, KERNEL_DTYPE), norm_weight.to(KERNEL_DEVICE)
    y = matvec.launch(x, w, 4, block_k, 2, norm_weight=norm_weight, eps=1e-5)
    assert y.shape == (M, N) and y.dtype == KERNEL_DTYPE
    h = _rmsnorm(x, norm_weight, 1e-5).to(KERNEL_DTYPE)
    torch.testing.assert_close(y.double(), h.double() @ w.double().T, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(y, matvec.few_rows_reference(x, w, norm_weight, 1e-5), atol=2e-3, rtol=1e-2)
    not_normed = matvec.launch(x.to(KERNEL_DTYPE), w, 4, 64, 2)
    assert (not_normed - y).abs().max() > 0.1          # the norm did something: x's rows have RMS ~3


@needs_kernel
@pytest.mark.parametrize("residual_dtype", [None, torch.float32, KERNEL_DTYPE])
@pytest.mark.parametrize("block_k", [128, 512])
def test_the_gated_input_and_the_residual_add(residual_dtype, block_k):
    """With ``glu``: x holds [gate | up] (2K per row) and the product is taken with silu(gate) * up, in float32 and
    rounded once to the weight's dtype; with a residual: the product rounded (what F.linear returns), plus the
    residual in float32, stored in their promoted dtype. In column blocks and in one pass (BLOCK_K >= K)."""
    M, N, K = 3, 96, 320
    g = torch.Generator().manual_seed(1)
    gate_up, w = torch.randn(M, 2 * K, generator=g) * 2, torch.randn(N, K, generator=g) / K ** 0.5
    gate_up, w = gate_up.to(KERNEL_DEVICE, KERNEL_DTYPE), w.to(KERNEL_DEVICE, KERNEL_DTYPE)
    residual = None if residual_dtype is None else torch.randn(M, N, generator=g).to(KERNEL_DEVICE, residual_dtype)
    y = matvec.launch(gate_up, w, 4, block_k, 2, glu=True, residual_MN=residual)
    gate, up = gate_up.float().chunk(2, dim=-1)
    h = (gate * torch.sigmoid(gate) * up).to(KERNEL_DTYPE)
    product = (h.double() @ w.double().T).to(KERNEL_DTYPE)
    expected = product if residual is None else residual.double() + product.double()
    assert y.dtype == (KERNEL_DTYPE if residual is None else torch.promote_types(residual_dtype, KERNEL_DTYPE))
    torch.testing.assert_close(y.double(), expected.double(), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(y, matvec.few_rows_reference(gate_up, w, glu=True, residual=residual),
                               atol=2e-3, rtol=1e-2)


def record_kernel_calls(patch, any_device: bool = True) -> list[tuple]:
    """Route ``transformer.linear``'s kernel calls through a recorder (``patch``: a monkeypatch or its context): each
    call's (x shape, weight shape, the fusions given). ``any_device``: ``few_rows`` alone decides, so the interpreter's
    CPU tensors take the kernel too."""
    calls = []

    def counted(x, weight, **fused):
        given = tuple(k for k, v in fused.items() if k != "eps" and v is not None and v is not False)
        calls.append((tuple(x.shape), tuple(weight.shape), given))
        return matvec.linear_few_rows(x, weight, **fused)
    if any_device:
        patch.setattr(transformer, "use_matvec", matvec.few_rows)
    patch.setattr(transformer, "linear_few_rows", counted)
    return calls


@needs_kernel
def test_a_cached_decoding_step_through_the_kernel(monkeypatch):
    """A tiny AR model's cached steps with every block's four Linear layers through the kernel (fp32 weights: the
    kernel sums in float32 whatever the dtype): qkv and gate_up with the norm in front, proj and down with the
    residual add, down with SwiGLU's activation; the logits of the unfused layers. The full forward's many rows
    keep F.linear. (Width 64: gate_up has 6 outputs per input, as AR-B's 5.3, within ``MAX_WIDEN``.)"""
    torch.manual_seed(0)
    config = GeneratorConfig(kind="ar", codebook_size=32, grid_size=4, num_classes=3, dim=64, depth=2, heads=2)
    model = ARGenerator(config).to(KERNEL_DEVICE)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    model.eval()
    ids, classes = torch.randint(0, 32, (3, 16), device=KERNEL_DEVICE), torch.tensor([0, 1, 3], device=KERNEL_DEVICE)

    def decode() -> torch.Tensor:
        model.backbone.setup_caches(3, 16, torch.float32, KERNEL_DEVICE)
        steps = [model.prefill(classes)]
        for p in range(1, 16):
            steps.append(model.decode_one_token(ids[:, p - 1], torch.tensor([p], device=KERNEL_DEVICE), classes))
        model.backbone.remove_caches()
        return torch.stack(steps, 1)

    with torch.no_grad():
        plain, full = decode(), model.logits(ids, classes)
        calls = record_kernel_calls(monkeypatch)
        through = decode()
        D_, Hd = config.dim, config.mlp_hidden
        per_block = [((3 * D_, D_), ("norm_weight",)), ((D_, D_), ("residual",)),
                     ((2 * Hd, D_), ("norm_weight",)), ((D_, Hd), ("glu", "residual"))]
        assert [(w, f) for _, w, f in calls] == per_block * 2 * 16     # 16 steps (prefill included), 2 blocks
        calls.clear()
        torch.testing.assert_close(model.logits(ids, classes), full, atol=0, rtol=0)
        assert not calls
    torch.testing.assert_close(through, plain, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_vars_one_token_first_scale_through_the_kernel(monkeypatch):
    """VAR's adaLN blocks (their norms stay outside) at its one-token first scale: qkv, proj and gate_up through
    the plain kernel and down with the activation fused; the later scales (4 tokens and more) keep F.linear; the
    ids a seed samples equal the unfused path's (fp32 weights: float32 sums either way). Width 64: gate_up has 6
    outputs per input, within ``MAX_WIDEN``."""
    from tests.generator.test_var import RefCodec, tiny_model
    model = tiny_model(dim=64).to(KERNEL_DEVICE)
    codec = RefCodec()
    codec.embed_VC = codec.embed_VC.to(KERNEL_DEVICE)

    def sample():
        gen = torch.Generator(KERNEL_DEVICE).manual_seed(5)
        return torch.cat([i.flatten(1) for i in model.sample([0, 2], codec=codec, cfg_scale=2.0, generator=gen)], 1)

    plain = sample()
    calls = record_kernel_calls(monkeypatch)
    through = sample()
    # 2 blocks x (qkv, proj, gate_up, down) at the first scale only, 4 rows (2 images under CFG), one token each
    assert sorted({(x, "glu" in f) for x, _, f in calls}) == [((4, 1, 64), False), ((4, 1, 384), True)]
    assert len(calls) == 2 * 4
    assert torch.equal(through, plain)


@needs_compiler
@pytest.mark.parametrize("norm, glu, residual", [(False, False, False), (True, False, False), (False, False, True),
                                                 (False, True, True)])
@pytest.mark.parametrize("one_pass", [False, True])
def test_every_kernel_a_block_launches_compiles_for_hopper(norm, glu, residual, one_pass):
    """The four variants a pre-norm block launches (qkv and gate_up: norm; proj: residual; down: glu and residual),
    at each one's launch (one pass over the row, BLOCK_K >= K) and in column blocks, through Triton's real compiler
    to sm_90."""
    signature = {"X": "*bf16", "W": "*bf16", "Y": "*fp32" if residual else "*bf16", "G": "*fp32",
                 "R": "*fp32" if residual else "*bf16", "M": "i32", "N": "i32", "K": "i32", "eps": "fp32",
                 "M_P2": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "NORM": "constexpr",
                 "GLU": "constexpr", "RESIDUAL": "constexpr", "ONE_PASS": "constexpr", "PDL": "constexpr",
                 "TRIGGER_FIRST": "constexpr"}
    N, K = (D, HIDDEN) if glu else (3 * D, D) if norm else (D, D)
    block_n, block_k, warps = matvec.launch_config(N, K) if one_pass else (4, 256, 2)   # shipped: one pass
    assert (block_k >= K) == one_pass
    kernel = compile_for_hopper(matvec._matvec_kernel, signature,
                                dict(M_P2=2, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm, GLU=glu, RESIDUAL=residual,
                                     ONE_PASS=block_k >= K, PDL=False, TRIGGER_FIRST=False), num_warps=warps)
    assert kernel.asm["cubin"] and "griddepcontrol" not in kernel.asm["ptx"]


@needs_compiler
@pytest.mark.skipif(not PDL_SUPPORTED, reason="this Triton has no programmatic dependent launch")
@pytest.mark.parametrize("norm, glu, residual", [(True, False, False), (False, True, True)])
@pytest.mark.parametrize("first", [False, True])
def test_launched_with_pdl_the_weight_is_read_before_the_wait(norm, glu, residual, first):
    """With PDL (NOTES A57) the one-pass kernel's first global loads are its weight slab, before
    ``griddepcontrol.wait``: they overlap the kernel before it. x, the norm and the residual, which that kernel
    may still be writing, are read after the wait; the output is stored after it. The next kernel may start as
    this one begins (``first``) or after its wait."""
    signature = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "G": "*fp32", "R": "*bf16", "M": "i32", "N": "i32",
                 "K": "i32", "eps": "fp32", **{name: "constexpr" for name in (
                     "M_P2", "BLOCK_N", "BLOCK_K", "NORM", "GLU", "RESIDUAL", "ONE_PASS", "PDL", "TRIGGER_FIRST")}}
    N, K = (D, HIDDEN) if glu else (3 * D, D)
    block_n, block_k, warps = matvec.launch_config(N, K)
    assert block_k >= K                    # AR-B's shapes launch in one pass
    kernel = compile_for_hopper(matvec._matvec_kernel, signature,
                                dict(M_P2=2, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm, GLU=glu, RESIDUAL=residual,
                                     ONE_PASS=True, PDL=True, TRIGGER_FIRST=first), num_warps=warps,
                                launch_pdl=True)
    ptx = kernel.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    before, after = ptx[:wait], ptx[wait:]
    assert before.count("ld.global") >= 1 and "st.global" not in before
    assert (ptx.index("griddepcontrol.launch_dependents") < ptx.index("ld.global")) == first
    assert after.count("ld.global") >= 2 and "st.global" in after       # x (and up, or the norm's weight), R


@needs_kernel
def test_the_routed_layers_trace_as_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) of a pre-norm MLP sublayer (norm, residual) whose two layers take the kernel:
    the custom ops are nodes of the graph (no break), with the eager call's output, which is the unfused formula's."""
    monkeypatch.setattr(transformer, "use_matvec", matvec.few_rows)
    torch.manual_seed(0)
    mlp, norm = transformer.SwiGLU(64, 128).to(KERNEL_DEVICE), transformer.RMSNorm(64).to(KERNEL_DEVICE)
    x = torch.randn(2, 1, 64, device=KERNEL_DEVICE)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(lambda x: mlp(x, norm=norm, residual=x), backend="eager", fullgraph=True)(x)
            torch.testing.assert_close(compiled, mlp(x, norm=norm, residual=x), atol=0, rtol=0)
            gate, up = mlp.gate_up(norm(x)).chunk(2, dim=-1)
            torch.testing.assert_close(compiled, x + mlp.down(F.silu(gate) * up), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_dropout_keeps_the_torch_ops(monkeypatch):
    """A sublayer in training with dropout on never takes the kernel (the dropout sits between the product and the
    residual add); the block's output is residual + dropout(branch)."""
    monkeypatch.setattr(transformer, "use_matvec", lambda *a: True)
    monkeypatch.setattr(transformer, "linear_few_rows", lambda *a, **k: pytest.fail("took the kernel"))
    layer, drop = torch.nn.Linear(8, 8, bias=False), torch.nn.Dropout(0.5)
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    y = transformer.linear(layer, x, residual=x, drop=drop)
    torch.manual_seed(0)
    torch.testing.assert_close(y, x + drop(layer(x)))


@pytest.mark.gpu
def test_on_a_gpu_sampling_takes_the_kernel_and_replays_its_ids(monkeypatch):
    """bf16 Linear weights under autocast, as the pipelines sample: the eager step calls the kernel for each block's
    four Linear layers, and the compiled step's first call, its CUDA-graph capture and a replay give the same ids."""
    monkeypatch.setattr(matvec, "ENABLED", True)
    torch.manual_seed(0)
    config = GeneratorConfig(kind="ar", codebook_size=64, grid_size=4, num_classes=3, dim=64, depth=2, heads=2)
    model = ARGenerator(config).cuda()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    model.eval().autocast_weights()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with monkeypatch.context() as m:
            calls = record_kernel_calls(m, any_device=False)
            model.sample([0, 1], generator=torch.Generator("cuda").manual_seed(0), cfg_scale=2.0, compile=False)
        assert len(calls) == 16 * 2 * 4 and {x for x, _, _ in calls} == {(4, 1, 64), (4, 1, 384)}   # CFG: 4 rows
        ids = [model.sample([0, 1], generator=torch.Generator("cuda").manual_seed(0), cfg_scale=2.0, compile=True)
               for _ in range(3)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])


def run_blocks(blocks: list[dict], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A cached step's blocks as the decoding step launches them at batch 1 (the norm + qkv mat-vec, the one-query
    attention, proj + residual, the norm + gate_up, SwiGLU + down + residual)."""
    from generator import decode_attention
    B, D = x.shape
    for b in blocks:
        qkv = matvec.linear_few_rows(x, b["qkv"], norm_weight=b["g1"])
        H, hd = b["k"].shape[1], b["k"].shape[3]
        a = decode_attention.attend_one_query(qkv[:, :D].reshape(B, H, 1, hd), b["k"], b["v"], mask).reshape(B, D)
        x = matvec.linear_few_rows(a, b["proj"], residual=x)
        x = matvec.linear_few_rows(matvec.linear_few_rows(x, b["gate_up"], norm_weight=b["g2"]), b["down"], glu=True,
                                   residual=x)
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not PDL_SUPPORTED, reason="needs CUDA and a Triton with PDL")
@pytest.mark.parametrize("first", [False, True])
def test_blocks_launched_with_pdl_equal_the_serial_launches_bit_for_bit(monkeypatch, first):
    """Eight AR-like blocks (dim 256, 4 heads, a 64-slot cache) replayed from a CUDA graph with the kernels launched
    with programmatic dependent launch (NOTES A57), letting the next kernel in after the wait or first: the same
    output, bit for bit, as launched one after another (a kernel reading its predecessor's output early would
    differ). On a GPU before Hopper both runs launch serially."""
    from generator import launch
    torch.manual_seed(0)
    D, H, S = 256, 4, 64
    blocks = [{"qkv": torch.randn(3 * D, D), "proj": torch.randn(D, D), "gate_up": torch.randn(4 * D, D),
               "down": torch.randn(D, 2 * D), "k": torch.randn(2, H, S, D // H), "v": torch.randn(2, H, S, D // H)}
              for _ in range(8)]
    blocks = [{n: (t * 0.05).to("cuda", torch.bfloat16) for n, t in b.items()} for b in blocks]
    for b in blocks:
        b["g1"], b["g2"] = (1 + 0.1 * torch.randn(D, device="cuda") for _ in range(2))
    mask, x0 = torch.ones(1, S, dtype=torch.bool, device="cuda"), torch.randn(2, D, device="cuda")
    outs = []
    for pdl in (False, True):
        monkeypatch.setattr(launch, "PDL", pdl)
        monkeypatch.setattr(launch, "PDL_TRIGGER_FIRST", first)
        with torch.no_grad():
            run_blocks(blocks, x0, mask)                    # compile the launches outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run_blocks(blocks, x0, mask)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], run_blocks(blocks, x0, mask), rtol=0, atol=0)
