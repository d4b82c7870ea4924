"""One-query attention over a KV cache (generator/decode_attention.py): the torch-ops reference on
every machine; the Triton kernel where it can run (CUDA, or Triton's CPU interpreter with
TRITON_INTERPRET=1 set before the import)."""
import math

import pytest
import torch
import torch.nn.functional as F

from generator import decode_attention as da
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


@needs_compiler
@pytest.mark.parametrize("block, warps, splits", [da.MANY, da.FEW, (64, 4, 4), (32, 2, 8)])
def test_the_kernel_compiles_for_hopper(block, warps, splits):
    """The one-query kernel at its launches and with split slots (the ticket's atomic, L2-only loads of the parts,
    the barrier) through Triton's real compiler to sm_90; the split one has the atomic in its PTX."""
    signature = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "M": "*i1", "O": "*bf16", "PART": "*fp32",
                 "TICKET": "*i32", "S": "i32", "chunk": "i32", "scale": "fp32",
                 **{name: "i32" for name in ("sq_b", "sq_h", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s", "sm_s",
                                             "so_b", "so_h")},
                 "H": "constexpr", "D": "constexpr", "BLOCK": "constexpr", "SPLITS": "constexpr"}
    kernel = compile_for_hopper(da._one_query_kernel, signature, dict(H=12, D=64, BLOCK=block, SPLITS=splits),
                                num_warps=warps)
    assert kernel.asm["cubin"] and ("atom.global" in kernel.asm["ptx"]) == (splits > 1)
