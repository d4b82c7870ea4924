"""generator/fused_draw.py: the one-pass confidence draw equals confidence_update's torch path (guidance,
argmax(p / E), log p of the candidate) on the rows the head ran at; the Triton kernel where it can run."""
import pytest
import torch

from generator import fused_draw as fd
from generator.masked import confidence_update
from generator.sampling import cfg_combine_doubled, draw_with_noise
from tests.kernels import KERNEL_DEVICE, compile_for_hopper, needs_compiler, needs_kernel


def torch_draw(logits, noise, positions, cfg_scale, temperature):
    """The torch path of confidence_update, written out: guidance (in float32), the noise at the rows'
    positions, the Gumbel-max draw and log softmax at the candidate."""
    g = cfg_combine_doubled(logits.float(), cfg_scale) if cfg_scale is not None else logits.float()
    if positions is not None:
        noise = noise.gather(1, positions[..., None].expand(-1, -1, noise.shape[-1]))
    cand, _ = draw_with_noise(g, noise, temperature)
    return cand, g.gather(-1, cand[..., None]).squeeze(-1) - g.logsumexp(-1)


def inputs(B, L, M, V, guided, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((2 * B if guided else B), M, V, generator=g)).to(dtype)
    noise = torch.empty(B, L, V).exponential_(generator=g)
    positions = torch.stack([torch.randperm(L, generator=g)[:M].sort().values for _ in range(B)]) if M < L else None
    return [t if t is None else t.to(KERNEL_DEVICE) for t in (logits, noise, positions)]


@needs_kernel
@pytest.mark.parametrize("B, L, M, V, guided, temperature", [
    (3, 10, 6, 2500, True, 1.0),       # the sampler's case: rows at positions, two full column blocks + a tail
    (2, 7, 7, 1000, False, 0.7),       # no guidance, every position, one partly filled block
    (1, 5, 2, 3000, True, 1.3),
])
def test_kernel_equals_the_torch_draw(B, L, M, V, guided, temperature):
    logits, noise, positions = inputs(B, L, M, V, guided, seed=V + M)
    scale = 2.0 if guided else None
    cand, conf = fd.confidence_draw(logits, noise, positions, scale, temperature)
    want_cand, want_conf = torch_draw(logits, noise, positions, scale, temperature)
    assert cand.dtype == torch.long and conf.dtype == torch.float32
    assert torch.equal(cand, want_cand)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_reads_bf16_logits_as_the_torch_path_does():
    logits, noise, positions = inputs(2, 9, 4, 1500, True, seed=3, dtype=torch.bfloat16)
    cand, conf = fd.confidence_draw(logits, noise, positions, 2.5, 1.0)
    want_cand, want_conf = torch_draw(logits, noise, positions, 2.5, 1.0)
    assert torch.equal(cand, want_cand)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("first, second", [(5, 700), (5, 5 + 1024), (1500, 2047)])
def test_equal_best_scores_take_the_first_column_as_torch_argmax(first, second):
    """Two columns with the same best score, in different lanes (5, 700), the same lane of two loop steps
    (5, 1029 at 1024 columns per step) or the second block: the lower column wins, as in torch.argmax."""
    V = 2048
    logits = torch.zeros(1, 1, V)
    logits[0, 0, [first, second]] = 4.0
    noise = torch.ones(1, 1, V)
    cand, conf = fd.confidence_draw(logits.to(KERNEL_DEVICE), noise.to(KERNEL_DEVICE), None, None, 1.0)
    assert cand.item() == first
    assert conf.item() == pytest.approx(4.0 - torch.logsumexp(logits[0, 0], 0).item(), abs=1e-5)


@needs_kernel
@pytest.mark.parametrize("M", [7, 4])
def test_one_unconditional_sequence_shared_by_the_batch(M):
    """(B + 1) rows: the conditional B and one unconditional sequence that guides every one of them (the
    sampler's first step), the same draw as the doubled batch with that sequence copied B times."""
    B, L, V = 3, 7, 1500
    logits, noise, _ = inputs(B, L, M, V, True, seed=M)
    shared = logits[:B + 1].contiguous()
    positions = torch.arange(L, device=noise.device)[:M].repeat(B, 1) if M < L else None   # the same in every row
    doubled = torch.cat([shared[:B], shared[B:].expand(B, -1, -1)]).contiguous()
    cand, conf = fd.confidence_draw(shared, noise, positions, 2.0, 1.0)
    want_cand, want_conf = torch_draw(doubled, noise, positions, 2.0, 1.0)
    assert torch.equal(cand, want_cand)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cand, fd.confidence_draw(logits, noise, positions, 2.0, 1.0)[0])   # B uncond rows differ


@needs_kernel
def test_shape_mismatch_is_a_clear_error():
    logits, noise, positions = inputs(2, 6, 3, 100, True, seed=0)
    with pytest.raises(ValueError, match="do not match noise"):
        fd.confidence_draw(logits[:2], noise, positions, 2.0, 1.0)      # 2B = 4 or B + 1 = 3 rows
    with pytest.raises(ValueError, match="positions"):
        fd.confidence_draw(logits, noise, positions[:, :2], 2.0, 1.0)


def test_dispatch_covers_only_the_unfiltered_cuda_draw():
    logits, noise = torch.randn(2, 3, 50), torch.ones(1, 3, 50)
    assert not fd.use_kernel(logits, noise, 1.0, 0, 1.0)                  # CPU: the torch path
    if torch.cuda.is_available():
        logits, noise = logits.cuda(), noise.cuda()
        assert fd.use_kernel(logits, noise, 1.0, 0, 1.0) == (fd.triton is not None and fd.ENABLED)
    assert not fd.use_kernel(logits, None, 0.0, 0, 1.0)                   # greedy: no noise
    assert not fd.use_kernel(logits, noise, 1.0, 10, 1.0)                 # top-k
    assert not fd.use_kernel(logits, noise, 1.0, 0, 0.9)                  # top-p
    assert not fd.use_kernel(logits, noise.double(), 1.0, 0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel inside the sampler's update on CUDA")
def test_update_with_the_kernel_picks_the_torch_paths_ids(monkeypatch):
    B, L, V = 4, 64, 16384
    logits, noise, _ = inputs(B, L, L, V, True, seed=1, dtype=torch.bfloat16)
    ids = torch.full((B, L), V, dtype=torch.long, device="cuda")
    ids[:, ::3] = 7                                                       # some clean tokens
    positions = (ids != V).to(torch.uint8).argsort(dim=1, stable=True)[:, :48].contiguous()
    logits = logits[:, :48].contiguous()
    choice = torch.randn(B, L, device="cuda")
    remain = torch.full((B,), 20, device="cuda")
    args = (logits, ids, remain, noise, choice)
    got = confidence_update(*args, mask_id=V, cfg_scale=2.0, positions_BM=positions)
    monkeypatch.setattr(fd, "ENABLED", False)
    want = confidence_update(*args, mask_id=V, cfg_scale=2.0, positions_BM=positions)
    assert torch.equal(got, want)


@needs_compiler
def test_kernel_compiles_for_hopper():
    """Triton's real front end and sm_90 back end accept the kernel in its config."""
    signature = {"LOGITS": "*bf16", "NOISE": "*fp32", "POS": "*i64", "KNOBS": "*fp32", "CAND": "*i64",
                 "CONF": "*fp32", "M": "i32", "L": "i32", "V": "i32", "HALF": "i64", "UNCOND_ROWS": "i64",
                 "GUIDED": "constexpr", "GATHER": "constexpr", "BLOCK": "constexpr"}
    for guided, gather in [(True, True), (False, False)]:
        kernel = compile_for_hopper(fd._draw_kernel, signature, dict(GUIDED=guided, GATHER=gather, BLOCK=fd.BLOCK),
                                    num_warps=fd.WARPS)
        assert kernel.asm["cubin"]
