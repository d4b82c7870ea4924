"""The few-rows Linear kernel (generator/matvec.py): which layers take it, its products against F.linear, and a
cached decoding step through it. The kernel runs on CUDA or Triton's CPU interpreter (TRITON_INTERPRET=1)."""
import pytest
import torch
import torch.nn.functional as F

from generator import matvec, transformer
from generator.autoregressive import ARGenerator
from generator.config import GeneratorConfig
from tests.kernels import KERNEL_DEVICE, KERNEL_DTYPE, compile_for_hopper, needs_compiler, needs_kernel

D, HIDDEN, V = 768, 2048, 16384     # AR-B


@pytest.mark.parametrize("name, N, K, takes", [("qkv", 3 * D, D, False), ("proj", D, D, True),
                                               ("gate_up", 2 * HIDDEN, D, False), ("down", D, HIDDEN, True),
                                               ("head", V, D, False)])
def test_only_outputs_no_wider_than_inputs_take_the_kernel(name, N, K, takes):
    """AR-B's five Linear shapes: the kernel where it beat cuBLAS in session 9's micro-benchmark (N <= K)."""
    weight = torch.empty(N, K, device="meta")
    assert matvec.few_rows(torch.empty(2, 1, K, device="meta"), weight) is takes
    assert not matvec.few_rows(torch.empty(16, 1, K, device="meta"), weight)           # 16 rows: cuBLAS
    assert not matvec.few_rows(torch.empty(2, 1, K, device="meta"), torch.empty(K, N, device="meta").t())


def test_off_by_default_and_never_on_the_cpu(monkeypatch):
    x, w = torch.randn(2, D), torch.randn(D, D)
    assert not matvec.ENABLED or not matvec.use_kernel(x, w)
    monkeypatch.setattr(matvec, "ENABLED", True)
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
@pytest.mark.parametrize("cfg", [(4, 128, 2), (16, 512, 4)])
def test_every_launch_the_benchmark_sweeps_is_the_linear(cfg):
    """Other (BLOCK_N, BLOCK_K, warps) than the shipped one (benchmarks/decode_matvec.py sweeps them), float32:
    the same sums to float32 rounding, masked edges in N and K."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(100, 300, generator=g) * 0.02, torch.randn(2, 300, generator=g)
    y = matvec.launch(x.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), *cfg).cpu()
    torch.testing.assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_cached_decoding_step_through_the_kernel(monkeypatch):
    """A tiny AR model's cached steps with the output projections and the MLP's down projections through the
    kernel (fp32 weights: the kernel sums in float32 whatever the dtype) give the logits of F.linear; the full
    forward's many rows keep F.linear."""
    torch.manual_seed(0)
    config = GeneratorConfig(kind="ar", codebook_size=32, grid_size=4, num_classes=3, dim=32, depth=2, heads=2)
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
        calls = []

        def counted(x, weight):
            calls.append(x.shape)
            return matvec.linear_few_rows(x, weight)
        monkeypatch.setattr(transformer, "use_matvec", matvec.few_rows)      # any device: the interpreter's CPU
        monkeypatch.setattr(transformer, "linear_few_rows", counted)
        through = decode()
        assert len(calls) == 16 * 2 * 2        # 16 steps (prefill included), 2 blocks, proj and down
        calls.clear()
        torch.testing.assert_close(model.logits(ids, classes), full, atol=0, rtol=0)
        assert not calls
    torch.testing.assert_close(through, plain, atol=1e-5, rtol=1e-5)


@needs_compiler
def test_the_kernel_compiles_for_hopper():
    signature = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32", "K": "i32", "M_P2": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    block_n, block_k, warps = matvec.LAUNCH
    kernel = compile_for_hopper(matvec._matvec_kernel, signature, dict(M_P2=2, BLOCK_N=block_n, BLOCK_K=block_k),
                                num_warps=warps)
    assert kernel.asm["cubin"]


@needs_kernel
def test_the_routed_layer_traces_as_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) of an MLP whose down projection takes the kernel: the custom op is one node
    of the graph (no break), with the eager call's output."""
    monkeypatch.setattr(transformer, "use_matvec", matvec.few_rows)
    torch.manual_seed(0)
    mlp = transformer.SwiGLU(64, 128).to(KERNEL_DEVICE)
    x = torch.randn(2, 1, 64, device=KERNEL_DEVICE)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(mlp, backend="eager", fullgraph=True)(x)
            torch.testing.assert_close(compiled, mlp(x), atol=0, rtol=0)
            gate, up = mlp.gate_up(x).chunk(2, dim=-1)
            torch.testing.assert_close(compiled, mlp.down(F.silu(gate) * up), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
def test_on_a_gpu_sampling_takes_the_kernel_and_replays_its_ids(monkeypatch):
    """bf16 Linear weights under autocast, as the pipelines sample: the eager step calls the kernel for each block's
    two output layers, and the compiled step's first call, its CUDA-graph capture and a replay give the same ids."""
    monkeypatch.setattr(matvec, "ENABLED", True)
    torch.manual_seed(0)
    config = GeneratorConfig(kind="ar", codebook_size=64, grid_size=4, num_classes=3, dim=64, depth=2, heads=2)
    model = ARGenerator(config).cuda()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    model.eval().autocast_weights()
    calls = []

    def counted(x, weight):
        calls.append(tuple(x.shape))
        return matvec.linear_few_rows(x, weight)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with monkeypatch.context() as m:
            m.setattr(transformer, "linear_few_rows", counted)
            model.sample([0, 1], generator=torch.Generator("cuda").manual_seed(0), cfg_scale=2.0, compile=False)
        assert len(calls) == 16 * 2 * 2 and set(calls) == {(4, 1, 64), (4, 1, 192)}     # 2 images, CFG: 4 rows
        ids = [model.sample([0, 1], generator=torch.Generator("cuda").manual_seed(0), cfg_scale=2.0, compile=True)
               for _ in range(3)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])
