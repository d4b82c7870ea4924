"""The masked sampler's FLOP count (benchmarks/roofline.py, the MFU of the sampling rows) against what the
sampler's forwards multiply, counted by torch's FlopCounterMode."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import roofline
from generator.config import GeneratorConfig
from generator.masked import MaskedGenerator, masked_counts
from generator.schedules import get_schedule


def test_masked_sampling_flops_are_the_forwards_matmuls_plus_attention():
    """Per step k, S_k sequences (2B with guidance; B + 1 at the first step, whose unconditional sequences are
    one) of 1 + L rows through every block, the head and the last block's projection and MLP at the M_k
    masked rows only: the matmuls FlopCounterMode sees, plus attention's 4 (1 + L)^2 D per layer (counted
    apart: which attention kernels it counts depends on the device and torch version)."""
    cfg = GeneratorConfig(kind="masked", codebook_size=16, grid_size=4, num_classes=3, dim=32, depth=2, heads=2)
    model = MaskedGenerator(cfg).eval()
    B, L, steps = 3, cfg.num_tokens, 4
    counts = masked_counts(L, get_schedule(cfg.schedule), steps)
    assert counts[-1] < counts[0] == L                      # later steps run at fewer rows
    seqs = [B + 1] + [2 * B] * (steps - 1)
    matmuls = 0
    with torch.no_grad():
        for S, m in zip(seqs, counts):
            pos = torch.stack([torch.randperm(L)[:m] for _ in range(S)])
            with FlopCounterMode(display=False) as fc:
                model(torch.randint(0, cfg.codebook_size + 1, (S, L)), torch.randint(0, 3, (S,)), pos)
            matmuls += sum(n for op, n in fc.get_flop_counts()["Global"].items() if "mm" in str(op))
    attention = sum(seqs) * cfg.depth * 4 * (L + 1) ** 2 * cfg.dim
    assert roofline.masked_sampling(cfg, 0, B, steps, cfg=True)["flops"] == matmuls + attention


def test_masked_sampling_flops_match_what_sample_multiplies():
    """The same count through ``sample()`` itself (guided, so the doubled batch; the head and last block at
    the masked positions the sampler picks): if the sampler stopped passing its positions, this fails."""
    cfg = GeneratorConfig(kind="masked", codebook_size=16, grid_size=4, num_classes=3, dim=32, depth=2, heads=2)
    model = MaskedGenerator(cfg).eval()
    B, L, steps = 3, cfg.num_tokens, 4
    with FlopCounterMode(display=False) as fc:
        model.sample([0, 1, 2], num_steps=steps, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    matmuls = sum(n for op, n in fc.get_flop_counts()["Global"].items() if "mm" in str(op))
    attention = (B + 1 + (steps - 1) * 2 * B) * cfg.depth * 4 * (L + 1) ** 2 * cfg.dim
    assert roofline.masked_sampling(cfg, 0, B, steps, cfg=True)["flops"] == matmuls + attention
