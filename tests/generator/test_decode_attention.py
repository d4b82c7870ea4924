"""One-query attention over a KV cache (generator/decode_attention.py): the torch-ops reference on
every machine; the Triton kernel where it can run (CUDA, or Triton's CPU interpreter with
TRITON_INTERPRET=1 set before the import)."""
import math

import pytest
import torch
import torch.nn.functional as F

from generator import decode_attention as da
from generator.launch import PDL_SUPPORTED
from tests.kernels import KERNEL_DEVICE, compile_for_hopper, needs_compiler, needs_kernel


def kernel(q, k, v, mask):
    return torch.ops.tessera.attend_one_query(q, k, v, mask)


IMPLEMENTATIONS = [pytest.param(da.attend_one_query_reference, id="reference"),
                   pytest.param(kernel, id="kernel", marks=needs_kernel)]


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("B", [3, 128])      # the kernel's two launch configurations (B x H < or >= 256)
def test_attend_one_query_is_masked_softmax_attention(attend, B):
    """Equals SDPA with the same mask and the formula; invisible slots get no weight, whatever they
    hold. Several blocks of the kernel's loop, the first all invisible (at B = 3, split over 8 programs)."""
    device = KERNEL_DEVICE if attend is kernel else "cpu"
    H, K = 2, 16
    block = da.launch_config(B * H)[0]
    S = 2 * block + 44
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, K, generator=g).to(device) for n in (1, S, S))
    mask = torch.rand(1, S, generator=g) < 0.5
    mask[0, :block] = False
    mask = mask.to(device)
    out = attend(q, k, v, mask)
    assert out.shape == (B, H, 1, K) and out.dtype == v.dtype
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    w = torch.softmax((q @ k[:, :, mask[0]].transpose(-1, -2)) / math.sqrt(K), dim=-1)
    torch.testing.assert_close(out, w @ v[:, :, mask[0]], atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, ~mask[0]], v2[:, :, ~mask[0]] = 1e4, -1e4
    torch.testing.assert_close(attend(q, k2, v2, mask), out, atol=0, rtol=0)


@needs_kernel
def test_kernel_reads_cache_slices_and_strided_queries_in_bf16():
    """As the decode step calls it: q a view of the fused qkv projection, k/v the first S slots of a
    longer cache, bf16; agrees with the reference to bf16 rounding (the kernel keeps P in float32)."""
    B, H, S, K = 2, 3, 70, 64
    g = torch.Generator().manual_seed(1)
    cache_k, cache_v = (torch.randn(B, H, 100, K, generator=g).to(KERNEL_DEVICE, torch.bfloat16) for _ in "kv")
    q = torch.randn(B, 1, 3, H, K, generator=g).to(KERNEL_DEVICE, torch.bfloat16).permute(2, 0, 3, 1, 4)[0]
    mask = torch.ones(1, S, dtype=torch.bool, device=KERNEL_DEVICE)
    mask[0, 60:] = False
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    out = kernel(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), da.attend_one_query_reference(q, k, v, mask).float(), atol=3e-2, rtol=3e-2)


def test_dispatch_takes_the_kernel_only_where_it_applies():
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 5, 16)
    row = torch.ones(1, 5, dtype=torch.bool)
    assert not da.use_kernel(q, k, k, row)                                    # CPU tensors: torch ops
    if torch.cuda.is_available() and da.triton is not None:
        qc, kc, rc = q.cuda(), k.cuda(), row.cuda()
        assert da.use_kernel(qc, kc, kc, rc)
        assert not da.use_kernel(qc, kc, kc, rc.expand(2, 5))                 # not one shared row
        assert not da.use_kernel(qc[..., :12], kc[..., :12], kc[..., :12], rc)   # head size not a power of 2


@needs_kernel
@pytest.mark.parametrize("splits, block, S", [(2, 32, 75), (4, 16, 70), (8, 16, 5), (4, 128, 300)])
def test_split_slots_combine_to_the_same_attention(monkeypatch, splits, block, S):
    """Few sequences, each one's slots split over ``splits`` programs whose parts the last one combines: equals the
    formula, call after call (the ticket counters carry over), with parts that are empty (S < splits x chunk) or
    all invisible (the first ``chunk`` slots masked), and next to another split count (its own counters)."""
    monkeypatch.setattr(da, "FEW", (block, 2, splits))
    B, H, K = 2, 3, 16
    g = torch.Generator().manual_seed(splits)
    chunk = -(-S // splits)
    for call in range(3):
        q, k, v = (torch.randn(B, H, n, K, generator=g).to(KERNEL_DEVICE) for n in (1, S, S))
        mask = torch.rand(1, S, generator=g) < 0.7
        mask[0, :chunk] = call == 1             # the first part all invisible in two of the calls
        mask[0, -1] = True
        mask = mask.to(KERNEL_DEVICE)
        w = torch.softmax((q @ k[:, :, mask[0]].transpose(-1, -2)) / math.sqrt(K), dim=-1)
        torch.testing.assert_close(kernel(q, k, v, mask), w @ v[:, :, mask[0]], atol=1e-5, rtol=1e-5)
        if call == 1:                           # a call with another split count between two of these
            monkeypatch.setattr(da, "FEW", (block, 2, 1 if splits > 2 else 4))
            torch.testing.assert_close(kernel(q, k, v, mask), w @ v[:, :, mask[0]], atol=1e-5, rtol=1e-5)
            monkeypatch.setattr(da, "FEW", (block, 2, splits))
    counters = da._tickets[next(key for key in da._tickets if key[2] == splits)]
    assert (counters[:B * H] % splits == 0).all() and counters[:B * H].sum() > 0


def test_split_counts_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        da.tickets(torch.device("cpu"), 3, 4)


# the one-query kernel's arguments as the ops launch it on a bf16 step (Triton's types for the sm_90 compile tests)
KERNEL_SIGNATURE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "M": "*i1", "O": "*bf16", "PART": "*fp32",
                    "TICKET": "*i32", "S": "i32", "chunk": "i32", "scale": "fp32",
                    **{name: "i32" for name in ("sq_b", "sq_h", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s",
                                                "sm_s", "so_b", "so_h")},
                    "QN": "*fp32", "KN": "*fp32", "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "eps": "fp32",
                    "sq_3": "i32", "max_len": "i32",
                    **{name: "constexpr" for name in ("H", "D", "BLOCK", "SPLITS", "NEW", "QK_NORM", "PDL",
                                                               "TRIGGER_FIRST")}}


@needs_compiler
@pytest.mark.parametrize("block, warps, splits", [da.MANY, da.FEW, (64, 4, 4), (32, 2, 8)])
def test_the_kernel_compiles_for_hopper(block, warps, splits):
    """The one-query kernel at its launches and with split slots (the ticket's atomic, L2-only loads of the parts,
    the barrier) through Triton's real compiler to sm_90; the split one has the atomic in its PTX."""
    kernel = compile_for_hopper(da._one_query_kernel, KERNEL_SIGNATURE,
                                dict(H=12, D=64, BLOCK=block, SPLITS=splits, NEW=False, QK_NORM=False, PDL=False,
                                     TRIGGER_FIRST=False),
                                num_warps=warps)
    assert kernel.asm["cubin"] and ("atom.global" in kernel.asm["ptx"]) == (splits > 1)
    assert "griddepcontrol" not in kernel.asm["ptx"]


@needs_compiler
@pytest.mark.skipif(not PDL_SUPPORTED, reason="this Triton has no programmatic dependent launch")
@pytest.mark.parametrize("new", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_launched_with_pdl_it_waits_for_the_kernel_before_it_first(new, first):
    """With PDL (NOTES A57) every read of the program comes after ``griddepcontrol.wait`` (the kernel before it may
    still be writing the qkv projection, the cache, the mask); it lets the next kernel start as it begins
    (``first``) or after its wait."""
    kernel = compile_for_hopper(da._one_query_kernel, KERNEL_SIGNATURE,
                                dict(H=12, D=64, BLOCK=32, SPLITS=8, NEW=new, QK_NORM=new, PDL=True,
                                     TRIGGER_FIRST=first),
                                num_warps=2, launch_pdl=True)
    ptx = kernel.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert wait < ptx.index("ld.global") and (ptx.index("griddepcontrol.launch_dependents") < wait) == first


# ---- a cached step's new query: qk-norm, RoPE and the cache write in the attention kernel (NOTES A56) ----------
def new_query_case(B, H, K, max_len, S, pos, dtype, seed=0):
    """A step's qkv projection (B, 3, H, K) as the step's view of (B, 1, 3, H, K), qk-norm weights, the RoPE row
    of ``pos``, caches of ``max_len`` slots full of old entries, and a mask over S slots that sees ``pos``."""
    from generator.transformer import rope_tables
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, 1, 3, H, K, generator=g) * 2).to(KERNEL_DEVICE, dtype)[:, 0]
    q_norm, k_norm = (1 + 0.2 * torch.randn(K, generator=g)).to(KERNEL_DEVICE), torch.rand(K, generator=g) + 0.5
    cos, sin = rope_tables(torch.arange(max_len), K)
    caches = [torch.randn(B, H, max_len, K, generator=g).to(KERNEL_DEVICE, dtype) for _ in "kv"]
    mask = torch.rand(1, S, generator=g) < 0.6
    mask[0, :min(pos + 1, S)] |= torch.arange(min(pos + 1, S)) == min(pos, S - 1)
    pos_1 = torch.tensor([pos], device=KERNEL_DEVICE)
    return (qkv, q_norm, k_norm.to(KERNEL_DEVICE), cos[[pos]].to(KERNEL_DEVICE), sin[[pos]].to(KERNEL_DEVICE),
            *caches, pos_1, mask.to(KERNEL_DEVICE))


def new_key_formula(x, weight, cos, sin, eps=1e-6):
    """RMSNorm (float32, rounded to x's dtype) then RoPE over the (first, second) halves, rounded again."""
    if weight is not None:
        xf = x.float()
        x = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def test_the_new_query_dispatch(monkeypatch):
    """``new_query_shapes``: a power-of-two head size, one (1, S) bool mask row, one table row, caches in the
    projection's dtype; ``use_new_query_kernel`` also wants ``NEW_QUERY``, CUDA, no autograd and a split launch:
    a few sequences (batch 1-4 under CFG: 2-8 sequences x 12 heads), not batch 64's 128."""
    qkv, k_cache = torch.randn(2, 3, 4, 16), torch.zeros(2, 4, 8, 16)
    mask, cos = torch.ones(1, 8, dtype=torch.bool), torch.ones(1, 8)
    assert da.new_query_shapes(qkv, k_cache, mask, cos)
    assert not da.new_query_shapes(qkv[..., :12], k_cache[..., :12], mask, cos[:, :6])     # head size 12
    assert not da.new_query_shapes(qkv, k_cache, mask.expand(2, 8), cos)                   # a mask per row
    assert not da.new_query_shapes(qkv, k_cache, mask.float(), cos)
    assert not da.new_query_shapes(qkv, k_cache, torch.ones(1, 9, dtype=torch.bool), cos)   # past the 8 slots
    assert not da.new_query_shapes(qkv, k_cache.half(), mask, cos)                        # caches in fp16
    assert not da.new_query_shapes(qkv, k_cache, mask, cos.expand(2, 8))                  # two positions
    assert da.split_launch(qkv) and da.split_launch(torch.empty(8, 3, 12, 64, device="meta"))
    assert not da.split_launch(torch.empty(128, 3, 12, 64, device="meta"))
    monkeypatch.setattr(da, "NEW_QUERY", True)
    assert not da.use_new_query_kernel(qkv, k_cache, mask, cos)                           # CPU tensors
    if torch.cuda.is_available() and da.triton is not None:
        args = [t.cuda() for t in (qkv, k_cache, mask, cos)]
        with torch.no_grad():
            assert da.use_new_query_kernel(*args)
            assert not da.use_new_query_kernel(torch.randn(128, 3, 4, 16, device="cuda"), *args[1:])   # unsplit
            monkeypatch.setattr(da, "NEW_QUERY", False)
            assert not da.use_new_query_kernel(*args)


@needs_kernel
@pytest.mark.parametrize("B, few, S, pos", [(2, (8, 2, 4), 30, 12), (2, (8, 2, 4), 30, 29), (2, (32, 2, 8), 30, 1),
                                            (2, (8, 2, 4), 30, 35), (2, (8, 2, 1), 30, 7), (130, None, 9, 3)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_new_query_writes_its_key_and_value_then_attends(monkeypatch, B, few, S, pos, qk_norm):
    """The new key (qk-norm, RoPE) and value land at slot ``pos`` of the caches and nowhere else, and q (qk-norm,
    RoPE) attends over the S slots the mask covers with them in: the formula, written out. The slot in the first,
    the middle or the last of 4 or 8 parts, past the mask (the last part writes it), one part, and batch 130's
    unsplit launch (2 x 130 programs)."""
    if few is not None:
        monkeypatch.setattr(da, "FEW", few)
    max_len, H, K = 40, 2, 16
    qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos_1, mask = new_query_case(B, H, K, max_len, S, pos,
                                                                                  torch.float32)
    norms = (q_norm, k_norm) if qk_norm else (None, None)
    k_old, v_old = k_cache.clone(), v_cache.clone()
    out = da.attend_new_query(qkv, *norms, 1e-6, cos, sin, k_cache, v_cache, pos_1, mask)
    q, k, v = (new_key_formula(qkv[:, i], w, cos, sin) if i < 2 else qkv[:, i] for i, w in enumerate((*norms, None)))
    k_old[:, :, pos], v_old[:, :, pos] = k, v
    assert torch.equal(v_cache, v_old)
    torch.testing.assert_close(k_cache, k_old, atol=1e-6, rtol=1e-6)
    w = torch.softmax((q[:, :, None] @ k_old[:, :, :S][:, :, mask[0]].transpose(-1, -2)) / math.sqrt(K), dim=-1)
    torch.testing.assert_close(out, w @ v_old[:, :, :S][:, :, mask[0]], atol=1e-5, rtol=1e-5)


@needs_kernel
def test_new_query_in_half_precision_is_the_torch_ops_step():
    """fp16 (the interpreter's half type; bf16 on CUDA): the kernel's step equals ``attend_new_query_reference``
    (the unfused step's torch ops): the caches to the bit, the output to half rounding (the kernel's P stays
    float32); a slot past the caches writes nothing."""
    dtype = torch.bfloat16 if KERNEL_DEVICE == "cuda" else torch.float16
    args = new_query_case(2, 3, 64, 20, 16, 9, dtype, seed=3)
    ref_args = [a.clone() for a in args]
    out = da.attend_new_query(*args[:3], 1e-6, *args[3:])
    ref = da.attend_new_query_reference(*ref_args[:3], 1e-6, *ref_args[3:])
    assert out.dtype == dtype and torch.equal(args[5], ref_args[5]) and torch.equal(args[6], ref_args[6])
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    past = list(args)
    past[7] = torch.tensor([20], device=KERNEL_DEVICE)
    caches = args[5].clone(), args[6].clone()
    da.attend_new_query(*past[:3], 1e-6, *past[3:])
    assert torch.equal(args[5], caches[0]) and torch.equal(args[6], caches[1])


@needs_kernel
def test_cached_ar_steps_through_the_new_query_kernel(monkeypatch):
    """A tiny AR model's cached steps with every block's attention through ``attend_new_query`` (the dispatch's
    shapes alone decide, so the interpreter's CPU tensors take it): the logits and the caches of the torch-ops
    steps; the prefill (an int slot) keeps ``attend_one_query``."""
    from generator import transformer
    from generator.autoregressive import ARGenerator
    from generator.config import GeneratorConfig
    torch.manual_seed(0)
    config = GeneratorConfig(kind="ar", codebook_size=32, grid_size=4, num_classes=3, dim=64, depth=2, heads=2)
    model = ARGenerator(config).to(KERNEL_DEVICE).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    ids, classes = torch.randint(0, 32, (3, 16), device=KERNEL_DEVICE), torch.tensor([0, 1, 2], device=KERNEL_DEVICE)

    def decode():
        model.backbone.setup_caches(3, 16, torch.float32, KERNEL_DEVICE)
        steps = [model.prefill(classes)]
        for p in range(1, 16):
            steps.append(model.decode_one_token(ids[:, p - 1], torch.tensor([p], device=KERNEL_DEVICE), classes))
        caches = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in model.backbone.blocks]
        model.backbone.remove_caches()
        return torch.stack(steps, 1), caches

    calls = []

    def counted(*args):
        calls.append(args[8].item())
        return da.attend_new_query(*args)
    with torch.no_grad():
        plain, plain_caches = decode()
        monkeypatch.setattr(transformer, "use_new_query_kernel", lambda *a: da.new_query_shapes(*a))
        monkeypatch.setattr(transformer, "attend_new_query", counted)
        through, caches = decode()
    assert calls == [p for p in range(1, 16) for _ in range(config.depth)]
    torch.testing.assert_close(through, plain, atol=1e-5, rtol=1e-5)
    for (k, v), (k0, v0) in zip(caches, plain_caches):
        torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)   # the layers below round alike to float32
        torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_a_compiled_step_writes_the_caches_in_place():
    """Under torch.compile (inductor) the op's cache arguments are the module's buffers themselves: no copy of a
    cache per step (a functionalised mutation that inductor failed to re-inplace would clone both every layer)."""
    from torch._inductor.utils import run_and_get_code
    qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos_1, mask = new_query_case(2, 2, 16, 12, 8, 5, torch.float32)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", k_cache.clone())
            self.register_buffer("v", v_cache.clone())

        def forward(self, qkv, pos_1):
            return da.attend_new_query(qkv * 1, q_norm, k_norm, 1e-6, cos, sin, self.k, self.v, pos_1, mask)

    step = Step()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out, (code, *_) = run_and_get_code(torch.compile(step, fullgraph=True), qkv, pos_1)
    finally:
        torch._dynamo.reset()
    eager_caches = k_cache.clone(), v_cache.clone()
    torch.testing.assert_close(out, da.attend_new_query(qkv, q_norm, k_norm, 1e-6, cos, sin, *eager_caches, pos_1,
                                                        mask), atol=1e-6, rtol=1e-6)
    assert torch.equal(step.k, eager_caches[0]) and torch.equal(step.v, eager_caches[1])
    assert "attend_new_query" in code and ".copy_(" not in code and "clone" not in code


@needs_compiler
@pytest.mark.parametrize("splits, qk_norm", [(1, True), (8, True), (8, False)])
def test_the_new_query_kernel_compiles_for_hopper(splits, qk_norm):
    """The kernel with the new query (NEW) at one and several parts, with and without qk-norm, to sm_90."""
    kernel = compile_for_hopper(da._one_query_kernel, KERNEL_SIGNATURE,
                                dict(H=12, D=64, BLOCK=32, SPLITS=splits, NEW=True, QK_NORM=qk_norm, PDL=False,
                                     TRIGGER_FIRST=False),
                                num_warps=2)
    assert kernel.asm["cubin"] and "st.global" in kernel.asm["ptx"]


def op_arguments(code: str, op: str) -> list[list[str]]:
    """The top-level arguments of each call of ``op`` in inductor's generated code."""
    calls = []
    for line in code.splitlines():
        if f"{op}(" not in line:
            continue
        rest, depth, args, current = line.split(f"{op}(", 1)[1], 0, [], ""
        for ch in rest:
            if ch == "(" or ch == "[":
                depth += 1
            elif ch in ")]" and depth == 0:
                break
            elif ch in ")]":
                depth -= 1
            if ch == "," and depth == 0:
                args.append(current.strip())
                current = ""
            else:
                current += ch
        calls.append(args + [current.strip()])
    return calls


@needs_kernel
def test_a_compiled_step_gathers_its_rope_and_mask_rows_once(monkeypatch):
    """A tiny AR model's cached step under torch.compile: every layer's ``attend_new_query`` takes the same RoPE
    rows and mask row, gathered once for the step (the ops' flexible layout, NOTES A58); under the default exact
    strides inductor copied the three rows for each layer's call, a kernel per layer and token."""
    from torch._inductor.utils import run_and_get_code

    from generator import transformer
    from generator.autoregressive import ARGenerator
    from generator.config import GeneratorConfig
    monkeypatch.setattr(transformer, "use_new_query_kernel", lambda *a: da.new_query_shapes(*a))
    torch.manual_seed(0)
    config = GeneratorConfig(kind="ar", codebook_size=32, grid_size=4, num_classes=3, dim=64, depth=3, heads=2)
    model = ARGenerator(config).to(KERNEL_DEVICE).eval()
    ids, classes = torch.randint(0, 32, (3,), device=KERNEL_DEVICE), torch.tensor([0, 1, 2], device=KERNEL_DEVICE)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            model.backbone.setup_caches(3, 16, torch.float32, KERNEL_DEVICE)
            model.prefill(classes)
            step = torch.compile(model.decode_one_token, fullgraph=True, dynamic=False)
            _, (code, *_) = run_and_get_code(step, ids, torch.tensor([1], device=KERNEL_DEVICE), classes)
    finally:
        torch._dynamo.reset()
        model.backbone.remove_caches()
    calls = op_arguments(code, "torch.ops.tessera.attend_new_query.default")
    assert len(calls) == config.depth
    cos, sin, mask = ({call[i] for call in calls} for i in (4, 5, 9))     # (qkv, q_norm, k_norm, eps, cos, sin, ...)
    assert len(cos) == len(sin) == len(mask) == 1, (cos, sin, mask)
