"""qk-norm + RoPE + full attention in one kernel (generator/fused_attention.py), against
``transformer.Attention``'s torch path. The kernel runs on CUDA, or on Triton's CPU interpreter with
TRITON_INTERPRET=1 set before the import (there in float16: the interpreter's bfloat16 matmuls are wrong)."""
import pytest
import torch

from generator import fused_attention as fa
from generator.transformer import Attention, apply_rope, rope_tables
from tests.kernels import KERNEL_DEVICE, KERNEL_DTYPE, compile_for_hopper, needs_compiler, needs_kernel

DTYPE = KERNEL_DTYPE


def attention(heads: int, head_dim: int, qk_norm: bool, seed: int) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(heads * head_dim, heads, qk_norm)
    if qk_norm:                                   # weights away from 1, so a skipped or swapped norm shows
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    return attn.to(KERNEL_DEVICE, DTYPE).eval()


def tables(L: int, head_dim: int):
    """RoPE tables with the L mod 16 leading rows at the identity (a class prefix), the rest 2D positions."""
    P = L % fa.PREFIX_BLOCK
    positions = torch.stack([torch.arange(L - P) // 5, torch.arange(L - P) % 5], dim=-1)
    return [t.to(KERNEL_DEVICE) for t in rope_tables(positions, head_dim, num_prefix=P)]


@needs_kernel
@pytest.mark.parametrize("method", fa.METHODS)
@pytest.mark.parametrize("B, L, heads, head_dim, qk_norm", [
    (2, 257, 2, 64, True),      # masked-B's shape per head: a 1-row prefix, two 128-row tiles of grid queries
    (1, 37, 3, 32, False),      # 5 prefix rows, a grid of 32 rows in one partly filled 64-row tile
    (3, 64, 1, 64, True),       # no prefix
    (1, 300, 2, 128, True),     # a partly filled last key block and query tile after a 12-row prefix
    (2, 9, 2, 32, True),        # prefix rows only (L < 16): one program per head, no grid rows
])
def test_kernel_equals_the_torch_path(B, L, heads, head_dim, qk_norm, method, monkeypatch):
    """attn.proj(kernel(qkv)) equals Attention's own torch path (grad enabled, so it does not dispatch to
    the kernel) to the input dtype's rounding of P (the kernel rounds P for P V as flash attention does), by
    either method: the one kernel, or the split (q/k pass, attention over the grid rows with its log-sum-exp:
    cuDNN on the GPU, float32 scores on the interpreter, then the merge of the prefix keys and rows)."""
    monkeypatch.setattr(fa, "METHOD", method)
    attn = attention(heads, head_dim, qk_norm, seed=L)
    cos, sin = tables(L, head_dim)
    x = torch.randn(B, L, heads * head_dim, device=KERNEL_DEVICE).to(DTYPE)
    with torch.no_grad():
        qkv = attn.qkv(x).view(B, L, 3, heads, head_dim)
        out = fa.fused_attention(qkv, attn.q_norm, attn.k_norm, cos, sin)
    ref = attn(x, cos, sin)
    assert out.shape == (B, L, heads * head_dim) and out.dtype == DTYPE
    torch.testing.assert_close(attn.proj(out), ref.detach(), atol=2e-2, rtol=2e-2)
    # and the formula in float64 on the same rounded q, k: softmax(q k^T / sqrt(K)) v
    q, k, v = qkv.unbind(2)
    rope = (cos[:, None], sin[:, None])
    q, k = apply_rope(attn.q_norm(q), *rope), apply_rope(attn.k_norm(k), *rope)
    w = torch.softmax(torch.einsum("blhk,bmhk->bhlm", q.double(), k.double()) * head_dim ** -0.5, dim=-1)
    exact = torch.einsum("bhlm,bmhk->blhk", w, v.double()).reshape(B, L, -1)
    torch.testing.assert_close(out.double(), exact, atol=1e-2, rtol=1e-2)
    assert (out.double() - exact).abs().mean() < 1e-3


@needs_kernel
@pytest.mark.parametrize("config", [c for c in fa.CANDIDATES if c.bm <= 128 and c.warps == 4]
                         + [fa.Config(256, 64, 8, 3, False)])          # one program per head
@pytest.mark.parametrize("L", [37, 64])
def test_every_candidate_config_gives_the_same_attention(config, L):
    """Each candidate tile shape, keys normalised in the attention or by the key pass (KPRE) alike, with and
    without the class token's rows (37: 5 leading rows; 64: none), equals the default config to the rounding
    of P and of the output (another BN changes the online softmax's order: a unit in the last place of the
    output dtype, 2^-7 in bfloat16 on the GPU, 2^-10 in float16 on the interpreter)."""
    B, heads, head_dim = 2, 2, 32
    attn = attention(heads, head_dim, True, seed=3)
    cos, sin = tables(L, head_dim)
    qkv = torch.randn(B, L, 3, heads, head_dim, device=KERNEL_DEVICE).to(DTYPE)
    q_w, k_w, eps = fa.norm_weights(attn.q_norm, attn.k_norm, qkv.device)
    with torch.no_grad():
        first = fa.launch(qkv, q_w, k_w, cos, sin, eps, fa.DEFAULT)
        out = fa.launch(qkv, q_w, k_w, cos, sin, eps, config)
    tol = 2e-3 if DTYPE == torch.float16 else 1.6e-2
    torch.testing.assert_close(out, first, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitwise determinism on the GPU")
@pytest.mark.parametrize("method", fa.METHODS)
def test_the_kernel_gives_the_same_bits_every_call_on_the_gpu(method, monkeypatch):
    """One fixed config, no autotuner (configs differ in the last bit, so a timing-based pick could change a
    seed's ids between processes): the same inputs give the same bits, call after call (either method)."""
    monkeypatch.setattr(fa, "METHOD", method)
    B, L, heads, head_dim = 4, 257, 12, 64
    attn = attention(heads, head_dim, True, seed=5)
    cos, sin = tables(L, head_dim)
    qkv = torch.randn(B, L, 3, heads, head_dim, device="cuda").to(DTYPE)
    q_w, k_w, eps = fa.norm_weights(attn.q_norm, attn.k_norm, qkv.device)
    with torch.no_grad():
        outs = [torch.ops.tessera.fused_attention(qkv, q_w, k_w, cos, sin, eps) for _ in range(3)]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


def test_the_config_override_is_parsed_or_named_as_wrong():
    assert fa.parse_config("128,32,8,3,1,128") == fa.Config(128, 32, 8, 3, True, 128)
    assert fa.parse_config("64,64,4,2,0") == fa.Config(64, 64, 4, 2, False, None)
    for bad in ["128,64", "128,64,4,3,1,128,9", "a,b,c,d,e", "100,64,4,3,1", "128,64,3,3,1"]:
        with pytest.raises(ValueError, match="TESSERA_ATTENTION_CONFIG"):
            fa.parse_config(bad)


@needs_kernel
@pytest.mark.parametrize("method", fa.METHODS)
def test_kernel_sees_every_key_and_only_its_own_head_and_batch(method, monkeypatch):
    """A huge value at one key of one head and one sequence moves only that head's and sequence's rows,
    all of them (the prefix key and the grid keys alike)."""
    monkeypatch.setattr(fa, "METHOD", method)
    B, L, heads, head_dim = 2, 33, 2, 32
    attn = attention(heads, head_dim, False, seed=0)
    cos, sin = tables(L, head_dim)
    qkv = torch.randn(B, L, 3, heads, head_dim, device=KERNEL_DEVICE).to(DTYPE) * 0.1
    with torch.no_grad():
        base = fa.fused_attention(qkv, attn.q_norm, attn.k_norm, cos, sin).view(B, L, heads, head_dim)
        for key in (0, 20, 32):                   # the prefix key (L mod 16 = 1), a grid key, the last one
            moved = qkv.clone()
            moved[1, key, 2, 0] = 100.0           # v of sequence 1, head 0
            out = fa.fused_attention(moved, attn.q_norm, attn.k_norm, cos, sin).view(B, L, heads, head_dim)
            changed = (out - base).abs().amax(-1) > 1e-3
            assert changed[1, :, 0].all() and not changed[0].any() and not changed[1, :, 1].any()


@needs_kernel
def test_kernel_reads_a_strided_qkv_view():
    """A non-contiguous qkv (a slice along the batch of a larger projection) gives the same as its copy."""
    B, L, heads, head_dim = 4, 20, 2, 32
    attn = attention(heads, head_dim, True, seed=1)
    cos, sin = tables(L, head_dim)
    qkv = torch.randn(B, L, 3, heads, head_dim, device=KERNEL_DEVICE).to(DTYPE)[::2]
    with torch.no_grad():
        a = fa.fused_attention(qkv, attn.q_norm, attn.k_norm, cos, sin)
        b = fa.fused_attention(qkv.contiguous(), attn.q_norm, attn.k_norm, cos, sin)
    assert torch.equal(a, b)


def test_attention_takes_the_kernel_only_when_enabled_for_no_grad_cuda_full_attention(monkeypatch):
    x = torch.zeros(1, 4, 3, 2, 32)
    attn = Attention(64, 2, qk_norm=True)
    monkeypatch.setattr(fa, "ENABLED", True)
    assert not fa.use_kernel(x.to(torch.bfloat16), attn.q_norm, attn.k_norm)     # CPU
    if torch.cuda.is_available() and fa.triton is not None:
        xc = x.cuda().to(torch.bfloat16)
        with torch.no_grad():
            assert fa.use_kernel(xc, attn.q_norm, attn.k_norm)
            assert not fa.use_kernel(xc.float(), attn.q_norm, attn.k_norm)           # float32 activations
            assert not fa.use_kernel(xc[..., :8], attn.q_norm, attn.k_norm)          # head size 8
        assert not fa.use_kernel(xc, attn.q_norm, attn.k_norm)                      # autograd on
        monkeypatch.setattr(fa, "ENABLED", False)
        with torch.no_grad():
            assert not fa.use_kernel(xc, attn.q_norm, attn.k_norm)                  # not opted in


@pytest.mark.gpu
def test_gpu_attention_module_dispatch_matches_the_torch_path(monkeypatch):
    """Attention.forward under no_grad on CUDA, opted in (the kernel), agrees with the same call under autograd (torch
    ops, cuDNN/flash SDPA), with and without qk-norm; a mask still takes the torch path."""
    monkeypatch.setattr(fa, "ENABLED", True)
    for qk_norm in (True, False):
        attn = Attention(128, 2, qk_norm).cuda().to(torch.bfloat16)
        cos, sin = tables(257, 64)
        x = torch.randn(3, 257, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fused = attn(x, cos, sin)
            masked = attn(x, cos, sin, mask_LS=torch.ones(257, 257, dtype=torch.bool, device="cuda"))
        torch.testing.assert_close(fused, attn(x, cos, sin).detach(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(masked, fused, atol=2e-2, rtol=2e-2)   # an all-visible mask: same attention


@needs_compiler
@pytest.mark.parametrize("config", [fa.DEFAULT, next(c for c in fa.CANDIDATES if not c.kpre),
                                    next(c for c in fa.CANDIDATES if c.maxnreg)])
def test_kernel_compiles_for_hopper(config):
    """Triton's compiler, down to sm_90 PTX and cubin, with no GPU: it rejects what the interpreter lets pass
    (a loop-carried tile whose shape changes, a branch that leaves a variable with two types)."""
    bm, bn, warps, stages, kpre, maxnreg = config
    ints = ["L", "P", "s_b", "s_l", "so_b", "so_l"]
    signature = {"QKV": "*bf16", "QW": "*fp32", "KW": "*fp32", "COS": "*fp32", "SIN": "*fp32", "KR": "*bf16",
                 "O": "*bf16", **dict.fromkeys(ints, "i32"), "eps": "fp32", "scale": "fp32",
                 **dict.fromkeys(["H", "K", "F_", "NORM", "BM", "BN", "PB", "KPRE"], "constexpr")}
    consts = dict(H=12, K=64, F_=32, NORM=True, BM=bm, BN=bn, PB=fa.PREFIX_BLOCK, KPRE=kpre)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    kernel = compile_for_hopper(fa._fused_attention_kernel, signature, consts, **options)
    assert kernel.asm["cubin"] and "wgmma" in kernel.asm["ptx"]     # Hopper's tensor-core instructions
    assert not maxnreg or f".maxnreg {maxnreg}" in kernel.asm["ptx"]    # the register cap reaches ptxas
    if kpre:        # the key pass as `_prepare_keys` launches it: the unused query-side pointers are the keys' scratch
        key_pass = {**PREP_SIGNATURE, **dict.fromkeys(["QR", "SP", "PACC", "PSTAT"], "*bf16")}
        assert compile_for_hopper(fa._prep_kernel, key_pass, prep_constants(False), num_warps=4).asm["cubin"]


PREP_SIGNATURE = {"QKV": "*bf16", "QW": "*fp32", "KW": "*fp32", "COS": "*fp32", "SIN": "*fp32", "QR": "*bf16",
                  "KR": "*bf16", "SP": "*fp32", "PACC": "*fp32", "PSTAT": "*fp32", "L": "i32", "P": "i32", "s_b": "i32",
                  "s_l": "i32", "eps": "fp32", "scale": "fp32",
                  **dict.fromkeys(["H", "K", "F_", "NORM", "BR", "PB", "QUERIES"], "constexpr")}


def prep_constants(queries: bool) -> dict:
    return dict(H=12, K=64, F_=32, NORM=True, BR=fa.PREP_ROWS, PB=fa.PREFIX_BLOCK, QUERIES=queries)


@needs_compiler
@pytest.mark.parametrize("prefix", [None, 1])
def test_the_split_passes_compile_for_hopper(prefix):
    """The split method's q/k pass and merge pass through Triton's real compiler (sm_90, no GPU). prefix 1:
    the JIT specialises an int argument equal to 1 into a constant, as it does for masked-B's one class token,
    which makes `if P > 0` static (Triton 3.6 then rejected a name the two branches left with two shapes)."""
    signature = dict(PREP_SIGNATURE, **({"P": "constexpr"} if prefix else {}))
    constants = dict(prep_constants(True), **({"P": prefix} if prefix else {}))
    assert compile_for_hopper(fa._prep_kernel, signature, constants, num_warps=4).asm["cubin"]
    ints = ["L", "P", "T", "s_b", "s_l", "og_b", "og_h", "og_l", "lse_b", "lse_h", "lse_l", "so_b", "so_l"]
    signature = {"QKV": "*bf16", "OG": "*bf16", "LSE": "*fp32", "SP": "*fp32", "PACC": "*fp32", "PSTAT": "*fp32",
                 "O": "*bf16",
                 **dict.fromkeys(ints, "i32"), **dict.fromkeys(["H", "K", "BM", "PB", "TB"], "constexpr")}
    consts = dict(H=12, K=64, BM=fa.MERGE_ROWS, PB=fa.PREFIX_BLOCK, TB=8)
    if prefix:
        signature["P"], consts["P"] = "constexpr", prefix
    assert compile_for_hopper(fa._merge_kernel, signature, consts, num_warps=4).asm["cubin"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's log-sum-exp on the GPU")
def test_attention_with_lse_on_the_gpu_is_the_formula():
    """The split's grid attention (aten's cuDNN kernel, or flash's) returns softmax(scale q k^T) v and the
    natural-log log-sum-exp of the scaled scores, on views laid out as the split passes them."""
    B, L, H, K = 2, 256, 3, 64
    q, k = (torch.randn(B, H, L + 1, K, device="cuda", dtype=torch.bfloat16)[:, :, 1:] for _ in range(2))
    v = torch.randn(B, L, 3, H, K, device="cuda", dtype=torch.bfloat16)[:, :, 2].transpose(1, 2)
    out, lse = fa.attention_with_lse(q, k, v, K ** -0.5)
    s = q.double() @ k.double().transpose(-1, -2) * K ** -0.5
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.double(), s.softmax(-1) @ v.double(), atol=1e-2, rtol=1e-2)
