"""Micro-benchmark (GPU): the per-token work of AR-B decoding at batch 1 that NOTES A26 found latency-bound,
to choose a replacement before changing the sampler.

    python3 -m benchmarks.decode_matvec

1. The five Linear shapes of an AR-B step (qkv, proj, gate_up, down, head) at M = 2 rows (batch 1 with CFG)
   and M = 128 (batch 64): ``F.linear`` (cuBLAS without a workspace, as the sampling commands run it) against
   generator/matvec.py's few-rows kernel (one program per BLOCK_N outputs streams its weight rows once, float32
   sums): its shipped launch (``matvec.launch_config``) and the best of a sweep of block sizes and warps, to set
   ``launch_config`` from; then the variant a pre-norm block launches at that layer (qkv and gate_up: the RMSNorm
   in front; proj: the residual add; down: SwiGLU's activation and the residual add, NOTES A52), shipped and
   swept. Session 8's other candidate, split-K batched matmuls, was slower than cuBLAS at every shape and split
   on an H200 (NOTES A28) and is gone.
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
# what a pre-norm block fuses into each layer's mat-vec (transformer.linear)
FUSED = {"qkv": dict(norm=True), "proj": dict(residual=True), "gate_up": dict(norm=True),
         "down": dict(glu=True, residual=True)}


def time_us(fn) -> float:
    return graph_time_us(fn, replays=100, calls=20)


def sweep(what: str, kernel, expected: torch.Tensor, shipped: tuple, mb: float) -> list[str]:
    """``kernel(cfg)`` at every launch of ``SWEEP``: its time at the shipped launch and the best one's, checked
    against ``expected`` first."""
    row, best = [], None
    for cfg in SWEEP:
        err = (kernel(cfg).float() - expected).abs().max().item()
        if err > 0.05:
            row.append(f"{what} {cfg} max error {err:.3f}")
            continue
        us = time_us(lambda cfg=cfg: kernel(cfg))
        best = min(best or (us, cfg), (us, cfg))
        if cfg == shipped:
            row.append(f"{what} as shipped {us:6.1f} us")
    if best:
        us, cfg = best
        row.append(f"{what} best {us:6.1f} us ({mb / us:4.2f} TB/s) BLOCK_N, BLOCK_K, warps = {cfg}")
    return row


def fused_case(x: torch.Tensor, weight: torch.Tensor, norm=False, glu=False, residual=False):
    """The block's fused variant at this layer, on its own input (with ``glu``, a [gate | up] row of twice the width):
    the kernel as a function of the launch, and its formula (generator.matvec.few_rows_reference) in float32."""
    M, (N, K) = x.shape[0], weight.shape
    x = torch.randn(M, 2 * K, device=x.device, dtype=x.dtype) if glu else x.float()   # a float32 residual stream
    norm_weight = 1 + 0.1 * torch.randn(K, device=x.device) if norm else None
    residual_MN = torch.randn(M, N, device=x.device) if residual else None
    expected = mv.few_rows_reference(x, weight.float(), norm_weight, glu=glu, residual=residual_MN)
    return (lambda cfg: mv.launch(x, weight, *cfg, norm_weight=norm_weight, glu=glu, residual_MN=residual_MN)), expected


def main() -> None:
    prefer_static_matmul_schedules()      # cuBLAS without a workspace, as the sampling commands run it (NOTES A45)
    torch.manual_seed(0)
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 weights, AR-B shapes; "
          f"us per call among 20 in one CUDA graph; matvec's launches (BLOCK_N, BLOCK_K, warps) from launch_config")
    for name, (K, N) in SHAPES.items():
        weight = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        mb = weight.numel() * 2 / 1e6
        for M in (2, 128):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            expected = F.linear(x.float(), weight.float())
            us = time_us(lambda: F.linear(x, weight))
            row = [f"{name:8s} {K:5d}->{N:5d} M={M:3d} [{mb:5.1f} MB]", f"F.linear {us:6.1f} us ({mb / us:4.2f} TB/s)"]
            if M <= mv.MAX_ROWS and mv.triton is not None:
                row += sweep("matvec", lambda cfg: mv.launch(x, weight, *cfg), expected, mv.launch_config(N, K), mb)
                if name in FUSED:
                    kernel, expected = fused_case(x, weight, **FUSED[name])
                    row += sweep(f"fused {'+'.join(FUSED[name])}", kernel, expected, mv.launch_config(N, K), mb)
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
