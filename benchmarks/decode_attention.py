"""Micro-benchmark (GPU): the cached AR step's attention, generator/decode_attention.py's Triton kernel at
each launch configuration vs the torch-ops reference compiled by inductor.

    python3 -m benchmarks.decode_attention

bf16, 12 heads of 64 (AR-B), a cache of 257 slots read up to S in {32, 160, 256} (the last 20 masked),
2 x 64 sequences (batch 64 with CFG) and 2 (batch 1); each op captured 20 times in one CUDA graph replayed
100 times, microseconds per call (as a decoding step's graph runs it). Kernel columns: slots per iteration /
warps, and at batch 1 also / splits (each sequence's slots over that many programs, combined by the last:
NOTES A54). Prints a table with each row's best; results in benchmarks/NOTES.md A17, A54 (H100, torch 2.11).
Not in run_all: it chose ``launch_config``; the end-to-end effect is sample-ar's row.
"""
import time

import torch

from generator import decode_attention as da

HEADS, HEAD_DIM, CACHE_SLOTS = 12, 64, 257          # AR-B, 256 tokens + the spare slot
CONFIGS = [(slots, warps, 1) for slots in (32, 64, 128) for warps in (2, 4, 8)]
SPLIT_CONFIGS = [(slots, warps, splits) for splits in (2, 4, 8) for slots in (32, 64) for warps in (2, 4)]


def graph_time_us(fn, replays: int = 300, calls: int = 1) -> float:
    """Microseconds per call of ``fn`` replayed from one CUDA graph (after eager and side-stream warm-up).
    ``calls`` > 1 captures that many calls in the graph: the time of a call among others in a graph (as a
    graph-captured decoding step runs them), without the replay's own launch."""
    for _ in range(5):
        fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / replays / calls * 1e6


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {HEADS} heads of {HEAD_DIM}")
    reference = torch.compile(da.attend_one_query_reference, dynamic=False)
    kernel = torch.ops.tessera.attend_one_query
    chosen = da.launch_config
    for B in (128, 2):
        cache_k, cache_v = (torch.randn(B, HEADS, CACHE_SLOTS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
                            for _ in "kv")
        qkv = torch.randn(B, 1, 3, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        q = qkv.permute(2, 0, 3, 1, 4)[0]                     # a view, as the decode step passes it
        for S in (32, 160, 256):
            k, v = cache_k[:, :, :S], cache_v[:, :, :S]
            mask = torch.ones(1, S, dtype=torch.bool, device=dev)
            mask[0, S - 20:] = False
            expected = da.attend_one_query_reference(q, k, v, mask).float()
            row = [f"sequences={B:3d} slots={S:3d} [{2 * B * HEADS * S * HEAD_DIM * 2 / 1e6:5.1f} MB]",
                   f"torch-ops compiled {graph_time_us(lambda: reference(q, k, v, mask), 100, 20):6.1f}"]
            times = {}
            for config in CONFIGS + (SPLIT_CONFIGS if B * HEADS < 256 else []):
                da.launch_config = lambda programs, c=config: c
                err = (kernel(q, k, v, mask).float() - expected).abs().max().item()
                times[config] = graph_time_us(lambda: kernel(q, k, v, mask), 100, 20)
                row.append("/".join(map(str, config[:2] if config[2] == 1 else config)) + f" {times[config]:5.1f}"
                           + ("" if err < 0.05 else f" (max error {err:.3f})"))
            da.launch_config = chosen
            best = min(times, key=times.get)
            in_use = times.get(chosen(B * HEADS), float("nan"))
            row.append(f"best {'/'.join(map(str, best))} {times[best]:.1f} (in use {in_use:.1f})")
            print("  ".join(row), flush=True)
    print("(us per call among 20 in a graph; launch_config picks "
          f"{chosen(128 * HEADS)} at batch 64 and {chosen(2 * HEADS)} at batch 1)")


if __name__ == "__main__":
    main()
