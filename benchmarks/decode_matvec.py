"""Micro-benchmark (GPU): the per-token work of AR-B decoding at batch 1 that NOTES A26 found latency-bound,
to choose a replacement before changing the sampler.

    python3 -m benchmarks.decode_matvec

1. The five Linear shapes of an AR-B step (qkv, proj, gate_up, down, head) at M = 2 rows (batch 1 with CFG)
   and M = 128 (batch 64): ``F.linear`` (cuBLAS without a workspace, as the sampling commands run it) against
   generator/matvec.py's few-rows kernel (one program per BLOCK_N outputs streams its weight rows once, float32
   sums): its shipped launch (``matvec.LAUNCH``) and the best of a sweep of block sizes and warps, to set
   ``LAUNCH`` from. Session 8's other candidate, split-K batched
   matmuls, was slower than cuBLAS at every shape and split on an H200 (NOTES A28) and is gone.
2. The k-th largest logit of top-k 2000 over 16384 codes at 1, 64, 1024 and 16384 rows: ``torch.topk``,
   ``torch.kthvalue``, a full sort, and ``generator.kth_largest``'s Triton kernel (what sampling runs on
   CUDA up to ``MAX_ROWS`` rows; called directly here at every row count, to place that limit).

bf16 weights (as the pipelines store them on a GPU), microseconds per call among 20 calls replayed from one
CUDA graph (``decode_attention.graph_time_us``: the time a call takes inside a captured decoding step),
with the weight bytes each shape reads and the bandwidth reached. Prints a table; not in run_all.
"""
import itertools

import torch
import torch.nn.functional as F

from benchmarks.decode_attention import graph_time_us
from generator import kth_largest as kl
from generator import matvec as mv
from generator.launch import prefer_static_matmul_schedules

D, HIDDEN, V = 768, 2048, 16384                      # AR-B
SHAPES = {"qkv": (D, 3 * D), "proj": (D, D), "gate_up": (D, 2 * HIDDEN), "down": (HIDDEN, D), "head": (D, V)}
TOP_K = 2000
SWEEP = list(itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8)))     # BLOCK_N, BLOCK_K, warps


def time_us(fn) -> float:
    return graph_time_us(fn, replays=100, calls=20)


def main() -> None:
    prefer_static_matmul_schedules()      # cuBLAS without a workspace, as the sampling commands run it (NOTES A45)
    torch.manual_seed(0)
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 weights, AR-B shapes; "
          f"us per call among 20 in one CUDA graph; matvec's shipped launch (BLOCK_N, BLOCK_K, warps) {mv.LAUNCH}")
    for name, (K, N) in SHAPES.items():
        weight = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        mb = weight.numel() * 2 / 1e6
        for M in (2, 128):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            expected = F.linear(x.float(), weight.float())
            us = time_us(lambda: F.linear(x, weight))
            row = [f"{name:8s} {K:5d}->{N:5d} M={M:3d} [{mb:5.1f} MB]", f"F.linear {us:6.1f} us ({mb / us:4.2f} TB/s)"]
            if M <= mv.MAX_ROWS and mv.triton is not None:
                best = None
                for cfg in SWEEP:
                    err = (mv.launch(x, weight, *cfg).float() - expected).abs().max().item()
                    if err > 0.05:
                        row.append(f"matvec {cfg} max error {err:.3f}")
                        continue
                    us = time_us(lambda cfg=cfg: mv.launch(x, weight, *cfg))
                    best = min(best or (us, cfg), (us, cfg))
                    if cfg == mv.LAUNCH:
                        row.append(f"matvec as shipped {us:6.1f} us")
                if best:
                    us, cfg = best
                    row.append(f"matvec best {us:6.1f} us ({mb / us:4.2f} TB/s) BLOCK_N, BLOCK_K, warps = {cfg}")
            print("  ".join(row), flush=True)
    for rows in (1, 64, 1024, 16384):
        logits = torch.randn(rows, V, device=dev)
        kth = kl.kth_largest_reference(logits, TOP_K)[:, 0]
        assert torch.equal(torch.kthvalue(logits, V - TOP_K + 1, dim=-1).values, kth)
        assert torch.equal(torch.ops.tessera.kth_largest(logits, TOP_K), kth)
        timings = {"topk": lambda: kl.kth_largest_reference(logits, TOP_K),
                   "kthvalue": lambda: torch.kthvalue(logits, V - TOP_K + 1, dim=-1).values,
                   "sort": lambda: torch.sort(logits, dim=-1, descending=True).values[:, TOP_K - 1],
                   "kernel": lambda: torch.ops.tessera.kth_largest(logits, TOP_K)}
        print(f"top-{TOP_K} threshold of {V}, {rows:5d} rows: "
              + "  ".join(f"{n} {time_us(fn):7.1f} us" for n, fn in timings.items()), flush=True)


if __name__ == "__main__":
    main()
