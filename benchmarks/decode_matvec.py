"""Micro-benchmark (GPU): the per-token work of AR-B decoding at batch 1 that NOTES A26 found latency-bound,
to choose a replacement before changing the sampler.

    python3 -m benchmarks.decode_matvec

1. The five Linear shapes of an AR-B step (qkv, proj, gate_up, down, head) at M = 2 rows (batch 1 with CFG)
   and M = 128 (batch 64): ``F.linear`` (cuBLAS, what runs now) against split-K, the input dimension cut
   into s chunks computed as one batched matmul over a weight stored once in that layout (s x more
   thread blocks streaming it) and summed in float32 (``split_k_linear``: the same products, another
   summation order, so bf16-rounding differences only).
2. The k-th largest logit of top-k 2000 over 16384 codes, one row and 64 rows: ``torch.topk`` (what
   ``top_k_top_p_filter`` runs) against ``torch.kthvalue`` and a full sort.

bf16 weights (as the pipelines store them on a GPU), microseconds per call replayed from one CUDA graph
(``decode_attention.graph_time_us``), with the weight bytes each shape reads and the bandwidth reached.
Prints a table; not in run_all.
"""
import torch
import torch.nn.functional as F

from benchmarks.decode_attention import graph_time_us

D, HIDDEN, V = 768, 2048, 16384                      # AR-B
SHAPES = {"qkv": (D, 3 * D), "proj": (D, D), "gate_up": (D, 2 * HIDDEN), "down": (HIDDEN, D), "head": (D, V)}
SPLITS = (2, 4, 8, 16)
TOP_K = 2000


def split_weight(weight_NK: torch.Tensor, splits: int) -> torch.Tensor:
    """A Linear weight (N, K) stored once as (splits, K/s, N) contiguous, the layout ``split_k_linear`` reads."""
    N, K = weight_NK.shape
    return weight_NK.t().reshape(splits, K // splits, N).contiguous()


def split_k_linear(x_MK: torch.Tensor, w_skN: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with the K dimension in s chunks: one batched matmul (s, M, K/s) @ (s, K/s, N), partial
    products summed in float32 -> (M, N) in x's dtype."""
    M, K = x_MK.shape
    x_sMk = x_MK.view(M, w_skN.shape[0], K // w_skN.shape[0]).transpose(0, 1)
    return torch.bmm(x_sMk, w_skN).sum(0, dtype=torch.float32).to(x_MK.dtype)


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 weights, AR-B shapes")
    for name, (K, N) in SHAPES.items():
        weight = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        mb = weight.numel() * 2 / 1e6
        for M in (2, 128):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            expected = F.linear(x.float(), weight.float())
            us = graph_time_us(lambda: F.linear(x, weight))
            row = [f"{name:8s} {K:5d}->{N:5d} M={M:3d} [{mb:5.1f} MB]", f"F.linear {us:6.1f} us ({mb / us:4.2f} TB/s)"]
            for s in SPLITS:
                w_skN = split_weight(weight, s)
                err = (split_k_linear(x, w_skN).float() - expected).abs().max().item()
                us = graph_time_us(lambda w_skN=w_skN: split_k_linear(x, w_skN))
                row.append(f"split {s:2d} {us:6.1f}" + ("" if err < 0.05 else f" (max error {err:.3f})"))
            print("  ".join(row), flush=True)
    for rows in (1, 64):
        logits = torch.randn(rows, V, device=dev)
        kth = torch.topk(logits, TOP_K, dim=-1, sorted=False).values.amin(dim=-1)
        assert torch.equal(torch.kthvalue(logits, V - TOP_K + 1, dim=-1).values, kth)
        timings = {"topk": lambda: torch.topk(logits, TOP_K, dim=-1, sorted=False).values.amin(dim=-1),
                   "kthvalue": lambda: torch.kthvalue(logits, V - TOP_K + 1, dim=-1).values,
                   "sort": lambda: torch.sort(logits, dim=-1, descending=True).values[:, TOP_K - 1]}
        print(f"top-{TOP_K} threshold of {V}, {rows:2d} rows: "
              + "  ".join(f"{n} {graph_time_us(fn):6.1f} us" for n, fn in timings.items()), flush=True)


if __name__ == "__main__":
    main()
