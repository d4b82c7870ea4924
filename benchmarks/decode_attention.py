"""Micro-benchmark (GPU): the cached AR step's attention, generator/decode_attention.py's Triton kernel at
each launch configuration vs the torch-ops reference compiled by inductor.

    python3 -m benchmarks.decode_attention

bf16, 12 heads of 64 (AR-B), a cache of 257 slots read up to S in {32, 160, 256} (the last 20 masked),
2 x 64 sequences (batch 64 with CFG) and 2 (batch 1); each op replayed 300 times from one CUDA graph,
microseconds per call. Prints a table; results in benchmarks/NOTES.md A17 (H100, torch 2.11). Not in
run_all: it chose ``launch_config``; the end-to-end effect is sample-ar's row.
"""
import time

import torch

from generator import decode_attention as da
torch.manual_seed(0)
dev = "cuda"

def timeit(fn, n=300):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6

ref_c = torch.compile(da.attend_one_query_reference, dynamic=False)
H, D, N = 12, 64, 257
for B in (128, 2):
    kc = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
    q = torch.randn(B, 1, 3, H, D, device=dev, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)[0]
    for S in (32, 160, 256):
        k, v = kc[:, :, :S], vc[:, :, :S]
        mask = torch.ones(1, S, dtype=torch.bool, device=dev); mask[0, S - 20:] = False
        ref = da.attend_one_query_reference(q, k, v, mask)
        row = [f"B={B:3d} S={S:3d} ref_compiled={timeit(lambda: ref_c(q, k, v, mask)):6.1f}us"]
        for blk in (32, 64, 128):
            for w in (2, 4, 8):
                da.launch_config = lambda programs, c=(blk, w): c
                out = torch.ops.tessera.attend_one_query(q, k, v, mask)
                err = (out.float() - ref.float()).abs().max().item()
                row.append(f"b{blk}w{w}={timeit(lambda: torch.ops.tessera.attend_one_query(q, k, v, mask)):5.1f}"
                           + ("" if err < 0.05 else f"(ERR {err:.3f})"))
        mb = 2 * B * H * S * D * 2 / 1e6
        print("  ".join(row), f" [{mb:.1f} MB]", flush=True)
