"""generator/philox_noise.py and fused_draw.noise_draw: PyTorch's CUDA Exp(1) noise made from (seed, offset).

A plain-Python curand Philox4x32-10 (checked against Random123's known-answer vectors) and ATen's layout give the
reference numbers; the Triton kernels must make them (on Triton's CPU interpreter: numpy's log, so to a few ulps), and
on CUDA exactly what ``exponential_`` draws, moving the generator's offset as it does."""
import logging

import pytest
import torch

from generator import fused_draw as fd
from generator import masked
from generator import philox_noise as pn
from generator.masked import confidence_step, confidence_update, scheduled_masked_count
from generator.schedules import get_schedule
from tests.generator.test_masked import randomised, tiny
from tests.kernels import KERNEL_DEVICE, compile_for_hopper, needs_compiler, needs_kernel

M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """curand's Philox4x32-10: ten rounds of (x, y, z, w) -> (hi(B z) ^ y ^ k0, lo(B z), hi(A x) ^ w ^ k1,
    lo(A x)), the key bumped by the Weyl constants after each."""
    x, y, z, w = ctr
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = divmod(0xD2511F53 * x, 2**32)
        hi1, lo1 = divmod(0xCD9E8D57 * z, 2**32)
        x, y, z, w = hi1 ^ y ^ k0, lo1, hi0 ^ w ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return x, y, z, w


def reference_exponential(numel: int, seed: int, offset: int, blocks_cap: int) -> torch.Tensor:
    """exponential_'s numbers written out: element (4k + w) T + t is word w of thread t's k-th curand4 call,
    counter (offset / 4 + k, t), through curand_uniform and ATen's -log."""
    layout = pn.layout_for(numel, blocks_cap)
    T, words = layout.threads, [0] * numel
    for t in range(T):
        for k in range(layout.calls):
            counter = offset // 4 + k
            for w, word in enumerate(philox4x32_10((counter & M32, counter >> 32, t, 0), (seed & M32, seed >> 32))):
                li = (4 * k + w) * T + t
                if li < numel:
                    words[li] = word
    u = torch.tensor(words, dtype=torch.int64).to(torch.float32) * 2.0**-32 + 2.0**-33
    return torch.where(u >= 1 - 2.0**-24, 2.0**-24, -torch.log(u))


@pytest.mark.parametrize("ctr, key, want", [     # Random123's kat_vectors for philox4x32 10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_gives_the_known_answers(ctr, key, want):
    assert philox4x32_10(ctr, key) == want


@pytest.mark.parametrize("numel, cap, threads, calls", [
    (64 * 256 * 16384, 132 * 8, 270336, 249),    # masked-B's (B, L, V) noise at batch 64 on an H100: 996 offsets
    (64 * 256, 132 * 8, 16384, 1),               # its (B, L) Gumbel noise: 64 blocks, one call each
    (1000, 132 * 8, 1024, 1),
    (4 * 1024 * 3 + 1, 4, 1024, 4),              # one element past three calls of all threads
])
def test_layout_follows_atens_launch(numel, cap, threads, calls):
    layout = pn.layout_for(numel, cap)
    assert (layout.threads, layout.calls, layout.increment) == (threads, calls, 4 * calls)


def test_layout_rejects_an_empty_draw_and_atens_split_draws():
    with pytest.raises(ValueError, match="no elements"):
        pn.layout_for(0, 8)
    assert pn.matches_torch(2**31 - 1) and not pn.matches_torch(2**31)


def test_a_stream_takes_each_draws_increment_in_order():
    stream = pn.NoiseStream(torch.zeros(2, dtype=torch.int64), blocks_cap=2)    # 512 threads
    assert stream.take(512 * 4 * 3) == (pn.layout_for(512 * 4 * 3, 2), 0)
    assert stream.take(10)[1] == 12 and stream.taken == 16


def test_noise_block_divides_the_vocabulary_and_the_threads():
    assert fd.noise_block(16384, 270336) == 1024
    assert fd.noise_block(1024, 1536) == 512        # T = 1.5 V: segments start mid-row, still inside one
    assert fd.noise_block(768, 2048) == 256
    assert fd.noise_block(1000, 1024) == 0          # no block: the sampler draws with exponential_


@needs_kernel
@pytest.mark.parametrize("shape, offset, cap", [((3, 700), 8, 2), ((5, 1000), 0, 3), ((2, 4, 256), 2**32 + 4, 1)])
def test_kernel_makes_the_reference_numbers(shape, offset, cap):
    seed = 0x9E3779B97F4A7C15              # both key words non-zero; above 2^63 (a negative int64 on the device)
    state = torch.tensor([seed - 2**64, offset], dtype=torch.int64, device=KERNEL_DEVICE)
    stream = pn.NoiseStream(state, blocks_cap=cap)
    numel = shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1)
    stream.taken = 4                        # a draw before this one
    got = pn.exponential(shape, stream)
    want = reference_exponential(numel, seed, offset + 4, cap).view(shape)
    # the reference takes the accurate log; the kernel ATen's fast one on CUDA (bit for bit with exponential_ there:
    # the gpu test below), numpy's on the interpreter
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    assert stream.taken == 4 + pn.layout_for(numel, cap).increment


def draw_inputs(B, L, M, V, guided, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((2 * B if guided else B), M, V, generator=g))
    positions = torch.stack([torch.randperm(L, generator=g)[:M].sort().values for _ in range(B)]) if M < L else None
    return logits.to(KERNEL_DEVICE), None if positions is None else positions.to(KERNEL_DEVICE)


@needs_kernel
@pytest.mark.parametrize("B, L, M, V, cap, guided, temperature", [
    (2, 6, 4, 512, 2, True, 1.0),       # 512 threads: each segment a whole row, three calls
    (3, 5, 5, 1024, 6, False, 0.8),     # 1536 threads = 1.5 rows: a block of 512 columns, segments mid-row
    (2, 7, 3, 256, 3, True, 1.2),
])
def test_noise_draw_equals_the_draw_on_stored_noise(B, L, M, V, cap, guided, temperature):
    logits, positions = draw_inputs(B, L, M, V, guided, seed=V + M)
    seed, offset = 77, 12
    state = torch.tensor([seed, offset], dtype=torch.int64, device=KERNEL_DEVICE)
    stream = pn.NoiseStream(state, blocks_cap=cap)
    scale = 2.0 if guided else None
    cand, conf = fd.noise_draw(logits, positions, stream, B, L, scale, temperature)
    noise = reference_exponential(B * L * V, seed, offset, cap).view(B, L, V).to(KERNEL_DEVICE)
    want_cand, want_conf = fd.confidence_draw(logits, noise, positions, scale, temperature)
    assert torch.equal(cand, want_cand)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)
    assert stream.taken == pn.layout_for(B * L * V, cap).increment


@needs_kernel
def test_noise_draw_with_one_shared_unconditional_sequence():
    """The first guided step: B + 1 logits rows, the last one the unconditional sequence of every row."""
    B, L, V = 3, 4, 512
    logits, _ = draw_inputs(B, L, L, V, guided=True, seed=5)
    logits = logits[:B + 1].contiguous()
    state = torch.tensor([3, 0], dtype=torch.int64, device=KERNEL_DEVICE)
    cand, conf = fd.noise_draw(logits, None, pn.NoiseStream(state, blocks_cap=2), B, L, 1.5, 1.0)
    noise = reference_exponential(B * L * V, 3, 0, 2).view(B, L, V).to(KERNEL_DEVICE)
    want_cand, want_conf = fd.confidence_draw(logits, noise, None, 1.5, 1.0)
    assert torch.equal(cand, want_cand)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_noise_draw_names_mismatched_shapes():
    logits, positions = draw_inputs(2, 6, 4, 512, True, seed=1)
    stream = pn.NoiseStream(torch.zeros(2, dtype=torch.int64, device=KERNEL_DEVICE), blocks_cap=2)
    with pytest.raises(ValueError, match="do not match batch 5"):
        fd.noise_draw(logits, positions, stream, 5, 6, 2.0, 1.0)
    with pytest.raises(ValueError, match="positions"):
        fd.noise_draw(logits, positions[:, :3], stream, 2, 6, 2.0, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7,), (64, 256), (3, 1000, 333), (64, 256, 16384)])
def test_cuda_kernel_is_exponential_bit_for_bit(shape):
    """The real thing: ATen's exponential_ on this GPU and the kernel, from the same generator state."""
    gen = torch.Generator("cuda").manual_seed(2**63 + 12345)
    gen.set_offset(40)
    want = torch.empty(shape, device="cuda").exponential_(generator=gen)
    moved = gen.get_offset() - 40
    gen.set_offset(40)
    stream = pn.NoiseStream(pn.state_of(gen, torch.device("cuda")))
    got = pn.exponential(shape, stream)
    assert torch.equal(got, want)
    assert stream.taken == moved


@needs_kernel
@pytest.mark.parametrize("s", [0.5, 0.0])      # with the annealed Gumbel term, and the last step's (none)
def test_confidence_step_draws_in_the_order_exponential_would(s):
    """A confidence step with a noise stream: the (B, L, V) noise at the state's offset, then the (B, L) Gumbel
    noise at the offset after it; the ids of ``confidence_update`` on those numbers."""
    B, L, M, V, cap = 2, 6, 4, 512, 2
    logits, positions = draw_inputs(B, L, M, V, True, seed=9)
    ids = torch.full((B, L), V, dtype=torch.long, device=KERNEL_DEVICE)
    ids.scatter_(1, positions[:, 3:], 7)                # one of the four positions per row already clean
    ids[:, 0] = 3                                       # a clean position outside them
    start = torch.full((B,), L, dtype=torch.long, device=KERNEL_DEVICE)
    state = torch.tensor([21, 4], dtype=torch.int64, device=KERNEL_DEVICE)
    stream = pn.NoiseStream(state, blocks_cap=cap)
    kw = dict(cfg_scale=2.0, positions_BM=positions, choice_temperature=4.5)
    got = confidence_step(logits, ids, s, get_schedule("cosine"), V, start, noise_stream=stream, **kw)
    noise = reference_exponential(B * L * V, 21, 4, cap).view(B, L, V).to(KERNEL_DEVICE)
    after = 4 + pn.layout_for(B * L * V, cap).increment
    choice = None
    if s > 0:
        choice = 4.5 * s * -reference_exponential(B * L, 21, after, cap).view(B, L).to(KERNEL_DEVICE).log()
    want = confidence_update(logits, ids, scheduled_masked_count(start, get_schedule("cosine"), s), noise, choice,
                             mask_id=V, cfg_scale=2.0, positions_BM=positions)
    assert torch.equal(got, want)
    assert stream.taken == after - 4 + (pn.layout_for(B * L, cap).increment if s > 0 else 0)


def test_a_calls_increment_is_its_draws(monkeypatch):
    """``confidence_noise_increment``: every step's (B, L, V) noise, the (B, L) Gumbel noise on all but the last."""
    monkeypatch.setattr(pn, "device_layout", lambda numel, device: pn.layout_for(numel, 132 * 8))
    assert masked.confidence_noise_increment((64, 256, 16384), 16, 4.5, torch.device("cuda")) == 16 * 996 + 15 * 4
    assert masked.confidence_noise_increment((64, 256, 16384), 8, 0.0, torch.device("cuda")) == 8 * 996


@pytest.fixture
def fresh_dynamo():
    """Compiled sampler functions of these models' shapes do not count against later tests' recompile limits."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("kw", [dict(cfg_scale=2.0), dict(), dict(cfg_scale=2.0, inpaint=True)])
def test_gpu_sampling_with_the_noise_made_in_the_draw_keeps_ids_and_generator_state(compile, kw, monkeypatch,
                                                                                    fresh_dynamo):
    """MaskedGenerator.sample on CUDA with ``FRESH_NOISE`` and without (exponential_ into memory): the same ids and
    the same generator state after, for a call run as is, recorded and replayed (compile: call graphs)."""
    V, G = 512, 4
    model = randomised(tiny(codebook_size=V)).cuda()
    kw = dict(kw)
    if kw.pop("inpaint", False):
        kw.update(known_ids=torch.randint(0, V, (3, G, G)), known_mask=torch.rand(3, G, G) < 0.5)
    made = []
    noise_draw = fd.noise_draw
    monkeypatch.setattr(fd, "noise_draw", lambda *a, **k: made.append(1) or noise_draw(*a, **k))

    def calls(fresh: bool):
        monkeypatch.setattr(fd, "FRESH_NOISE", fresh)
        out = []
        for _ in range(3 if compile else 1):
            g = torch.Generator("cuda").manual_seed(11)
            out.append((model.sample([0, 1, 2], num_steps=5, compile=compile, generator=g, **kw), g.get_state()))
        return out

    with torch.autocast("cuda", dtype=torch.bfloat16):
        fresh, stored = calls(True), calls(False)
    assert made                                          # the path ran (a replay runs no Python)
    for (ids, state), (want_ids, want_state) in zip(fresh, stored):
        assert torch.equal(ids, want_ids)
        assert torch.equal(state, want_state)


@pytest.mark.gpu
def test_gpu_compiled_update_stays_compiled_through_every_step_count(fresh_dynamo, caplog):
    """@16 and @8 at batch 3, then batch 1, as the benchmark job calls them: the update takes the drawn candidates
    with M dynamic, so it never reaches dynamo's recompile limit (session 24's runs did at batch 1, NOTES A50)."""
    model = randomised(tiny(codebook_size=256, grid_size=16)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16), caplog.at_level(logging.WARNING):
        for b, n in [(3, 16), (3, 8), (1, 16), (1, 16), (1, 16)]:
            model.sample(list(range(b)), num_steps=n, cfg_scale=2.0, compile=True,
                         generator=torch.Generator("cuda").manual_seed(0))
    assert "running it eagerly" not in caplog.text and "recompile_limit" not in caplog.text
    assert all(fn.compiled for fn in model._compiled[:4])


@pytest.mark.gpu
def test_gpu_default_generator_moves_on_as_exponential_would(monkeypatch, fresh_dynamo):
    model = randomised(tiny(codebook_size=256)).cuda()
    default = torch.cuda.default_generators[torch.cuda.current_device()]
    out = []
    for fresh in (True, False):
        monkeypatch.setattr(fd, "FRESH_NOISE", fresh)
        torch.cuda.manual_seed(5)
        out.append((model.sample([1, 2], num_steps=4, cfg_scale=2.0), default.get_offset()))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]


@needs_compiler
def test_kernels_compile_for_hopper():
    """Triton's real compiler takes both kernels to sm_90 (the interpreter runs them as Python)."""
    signature = {"LOGITS": "*bf16", "SLOT": "*i32", "STATE": "*i64", "PART": "*fp32", "START": "i64", "V": "i32",
                 "T": "i32", "scale": "fp32", "temperature": "fp32", "HALF": "i64", "UNCOND_ROWS": "i64", "R": "i32",
                 "BLOCKS": "i32", "GUIDED": "constexpr", "DIVIDE": "constexpr", "BLOCK": "constexpr"}
    for guided, divide in [(True, False), (False, True)]:
        kernel = compile_for_hopper(fd._noise_draw_kernel, signature,
                                    dict(GUIDED=guided, DIVIDE=divide, BLOCK=fd.NOISE_BLOCK), num_warps=fd.NOISE_WARPS)
        assert kernel.asm["cubin"] and "lg2.approx" in kernel.asm["ptx"]       # ATen's __logf, inlined
    signature = {"OUT": "*fp32", "STATE": "*i64", "START": "i64", "N": "i32", "T": "i32", "BLOCK": "constexpr"}
    assert compile_for_hopper(pn._exponential_kernel, signature, dict(BLOCK=256), num_warps=4).asm["cubin"]
