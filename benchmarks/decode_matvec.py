"""Micro-benchmark (GPU): the per-token work of AR-B decoding at batch 1 that NOTES A26 found latency-bound,
to choose a replacement before changing the sampler.

    python3 -m benchmarks.decode_matvec [--warm] [--plain] [--chain | --topk]

1. The five Linear shapes of an AR-B step (qkv, proj, gate_up, down, head) at M = 2 rows (batch 1 with CFG)
   and M = 128 (batch 64): ``F.linear`` (cuBLAS without a workspace, as the sampling commands run it) against
   generator/matvec.py's few-rows kernel (one program per BLOCK_N outputs streams its weight rows once, float32
   sums): its shipped launch (``matvec.launch_config``) and the best of a sweep of block sizes and warps, to set
   ``launch_config`` from; then the variant a pre-norm block launches at that layer (qkv and gate_up: the RMSNorm
   in front; proj: the residual add; down: SwiGLU's activation and the residual add, NOTES A52), shipped and
   swept. Session 8's other candidate, split-K batched matmuls, was slower than cuBLAS at every shape and split
   on an H200 (NOTES A28) and is gone.
2. AR-B's blocks in a chain (``layer_chain``; ``--chain``: only this): a step's five kernels per block, 24 blocks
   of cold weights and caches in one CUDA graph, under session 25's launches and ``launch_config``'s, each with
   programmatic dependent launch off and on (NOTES A57); with PDL the output must equal PDL off's bit for bit
   (a kernel reading what the one before writes too early would show here).
3. The k-th largest logit of top-k 2000 over 16384 codes at 1, 64, 1024 and 16384 rows: ``torch.topk``,
   ``torch.kthvalue``, a full sort, and ``generator.kth_largest``'s Triton kernel (what sampling runs on
   CUDA at every row count), at its launch; at 1 and 64 rows also with 4-32 warps (`kernel Ww`).

bf16 weights (as the pipelines store them on a GPU), microseconds per call among the calls replayed from one
CUDA graph (``decode_attention.graph_time_us``: the time a call takes inside a captured decoding step),
with the weight bytes each shape reads and the bandwidth reached. The weights are read cold, as in a step: each
call of the graph reads its own copy of the weight, enough copies for ``COLD_MB`` (several times the L2 cache),
where an AR-B step streams 170 MB of weights through a 50 MB L2 (session 29: the sweep of sessions 9-25 read
one weight 20 times over, from L2, and chose launches for that). ``--warm`` times one weight as before.
Prints a table; not in run_all.
"""
import argparse
import itertools
import math

import torch
import torch.nn.functional as F

from benchmarks.decode_attention import graph_time_us
from generator import kth_largest as kl
from generator import matvec as mv
from generator.launch import prefer_static_matmul_schedules

D, HIDDEN, V = 768, 2048, 16384                      # AR-B
SHAPES = {"qkv": (D, 3 * D), "proj": (D, D), "gate_up": (D, 2 * HIDDEN), "down": (HIDDEN, D), "head": (D, V)}
TOP_K = 2000
SWEEP = list(itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (2, 4, 8)))     # BLOCK_N, BLOCK_K, warps
COLD_MB = 400               # weights each graph replay reads: 8x an H100's L2 (50 MB), ~3x an H200's
# what a pre-norm block fuses into each layer's mat-vec (transformer.linear)
FUSED = {"qkv": dict(norm=True), "proj": dict(residual=True), "gate_up": dict(norm=True),
         "down": dict(glu=True, residual=True)}


def time_us(fn, copies: list[torch.Tensor]) -> float:
    """``fn(weight)`` per call among calls on each of ``copies`` in turn (at least 20), in one CUDA graph."""
    turn = itertools.cycle(copies)
    return graph_time_us(lambda: fn(next(turn)), replays=50, calls=max(20, len(copies)))


def weight_copies(weight: torch.Tensor, cold: bool) -> list[torch.Tensor]:
    """The weight once (``--warm``: every call reads it from L2 after the first), or enough copies for ``COLD_MB``."""
    mb = weight.numel() * weight.element_size() / 1e6
    return [weight] + [weight.clone() for _ in range(math.ceil(COLD_MB / mb) - 1 if cold else 0)]


def fits(cfg: tuple, M: int, K: int) -> bool:
    """A launch worth timing: BLOCK_K at most K's power of two (more is masked lanes), and the float32 partial
    sums of (M, BLOCK_N, BLOCK_K) at most 128 registers a thread (more spills)."""
    block_n, block_k, warps = cfg
    pow2 = mv.triton.next_power_of_2
    return block_k <= max(256, pow2(K)) and pow2(M) * block_n * block_k <= 128 * 32 * warps


def sweep(what: str, kernel, expected: torch.Tensor, shipped: tuple, mb: float, copies: list) -> list[str]:
    """``kernel(cfg, weight)`` at every launch of ``SWEEP`` that ``fits``: its time at the shipped launch and the
    best three, each checked against ``expected`` first."""
    row, timed = [], []
    M, K = expected.shape[0], copies[0].shape[1]
    for cfg in [c for c in SWEEP if fits(c, M, K)]:
        err = (kernel(cfg, copies[0]).float() - expected).abs().max().item()
        if err > 0.05:
            row.append(f"{what} {cfg} max error {err:.3f}")
            continue
        us = time_us(lambda w, cfg=cfg: kernel(cfg, w), copies)
        timed.append((us, cfg))
        if cfg == shipped:
            row.append(f"{what} as shipped {us:6.1f} us")
    row += [f"{what} {us:6.1f} us ({mb / us:4.2f} TB/s) {cfg}" for us, cfg in sorted(timed)[:3]]
    return row


def fused_case(x: torch.Tensor, weight: torch.Tensor, norm=False, glu=False, residual=False):
    """The block's fused variant at this layer, on its own input (with ``glu``, a [gate | up] row of twice the width):
    the kernel as a function of the launch, and its formula (generator.matvec.few_rows_reference) in float32."""
    M, (N, K) = x.shape[0], weight.shape
    x = torch.randn(M, 2 * K, device=x.device, dtype=x.dtype) if glu else x.float()   # a float32 residual stream
    norm_weight = 1 + 0.1 * torch.randn(K, device=x.device) if norm else None
    residual_MN = torch.randn(M, N, device=x.device) if residual else None
    expected = mv.few_rows_reference(x, weight.float(), norm_weight, glu=glu, residual=residual_MN)
    return (lambda cfg, w: mv.launch(x, w, *cfg, norm_weight=norm_weight, glu=glu, residual_MN=residual_MN)), expected


def session25_launch(N: int, K: int) -> tuple[int, int, int]:
    """``matvec.launch_config`` as session 25's warm sweep set it (NOTES A49)."""
    if N <= K:
        return 4, 512, 2
    return (4, 256, 2) if N <= 3 * K else (8, 256, 2)


def layer_chain(layers: int = 24, slots: int = 256) -> list[str]:
    """A cached step's blocks at batch 1 under CFG (2 rows), as the step launches them: the RMSNorm + qkv mat-vec,
    the one-query attention over ``slots`` cache slots, proj + residual, RMSNorm + gate_up, SwiGLU + down +
    residual; ``layers`` blocks, each with its own weights and cache (cold, ~16 MB a block), in one CUDA graph.
    us per block under {session 25's launches, ``launch_config``} x {PDL off, on with the next kernel let in after
    the wait, on with it let in as each kernel begins}."""
    from unittest import mock

    from generator import decode_attention as da
    from generator import launch
    H, hd = D // 64, 64
    blocks = [dict(qkv=torch.randn(3 * D, D), proj=torch.randn(D, D), gate_up=torch.randn(2 * HIDDEN, D),
                   down=torch.randn(D, HIDDEN), k=torch.randn(2, H, slots, hd), v=torch.randn(2, H, slots, hd))
              for _ in range(layers)]
    blocks = [{k: (t * 0.02).to("cuda", torch.bfloat16) for k, t in b.items()} for b in blocks]
    g1, g2 = (1 + 0.1 * torch.randn(D, device="cuda") for _ in range(2))
    mask = torch.ones(1, slots, dtype=torch.bool, device="cuda")
    x0 = torch.randn(2, D, device="cuda")

    def step():
        x = x0
        for b in blocks:
            qkv = mv.linear_few_rows(x, b["qkv"], norm_weight=g1)
            q = qkv[:, :D].reshape(2, H, 1, hd)
            a = da.attend_one_query(q, b["k"], b["v"], mask).reshape(2, D)
            x = mv.linear_few_rows(a, b["proj"], residual=x)
            h = mv.linear_few_rows(x, b["gate_up"], norm_weight=g2)
            x = mv.linear_few_rows(h, b["down"], glu=True, residual=x)
        return x

    rows, outs = [], {}
    for name, config in (("session 25's launches", session25_launch), ("launch_config", mv.launch_config)):
        for pdl, first in ((False, False), (True, False), (True, True)):
            with (mock.patch.object(mv, "launch_config", config), mock.patch.object(launch, "PDL", pdl),
                  mock.patch.object(launch, "PDL_TRIGGER_FIRST", first), torch.no_grad()):
                outs[name, pdl, first] = step()
                us = graph_time_us(step, replays=50) / layers
            what = "off" if not pdl else "on, next kernel in " + ("first" if first else "after the wait")
            rows.append(f"{name}, PDL {what}: {us:5.2f} us per block")
    ref = outs["session 25's launches", False, False]
    err = max((o - ref).abs().max().item() for o in outs.values())
    rows.append(f"(outputs after {layers} blocks: max difference between the six {err:.2e})")
    for name in ("session 25's launches", "launch_config"):      # PDL changes when kernels start, not a sum
        for pdl_first in ((True, False), (True, True)):
            same = torch.equal(outs[(name, *pdl_first)], outs[name, False, False])
            rows.append(f"{name}: PDL {'first' if pdl_first[1] else 'after the wait'} output "
                        f"{'equal to' if same else 'DIFFERS FROM'} PDL off (bit for bit)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", action="store_true", help="every call reads one weight (from L2), as sessions 9-25 did")
    ap.add_argument("--plain", action="store_true", help="also sweep the kernel without the block's fused work")
    ap.add_argument("--chain", action="store_true", help="only the chain of blocks (no sweep, no top-k)")
    ap.add_argument("--topk", action="store_true", help="only the top-k thresholds (no sweep, no chain)")
    args = ap.parse_args()
    prefer_static_matmul_schedules()      # cuBLAS without a workspace, as the sampling commands run it (NOTES A45)
    torch.manual_seed(0)
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 weights, AR-B shapes, "
          f"{'warm (one weight)' if args.warm else f'cold (~{COLD_MB} MB of weight copies per replay)'}; "
          f"us per call in one CUDA graph; matvec's launches (BLOCK_N, BLOCK_K, warps), shipped from launch_config")
    for name, (K, N) in ({} if args.chain or args.topk else SHAPES).items():
        weight = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        mb = weight.numel() * 2 / 1e6
        copies = weight_copies(weight, cold=not args.warm)
        for M in (2, 128):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            expected = F.linear(x.float(), weight.float())
            us = time_us(lambda w: F.linear(x, w), copies)
            row = [f"{name:8s} {K:5d}->{N:5d} M={M:3d} [{mb:5.1f} MB]", f"F.linear {us:6.1f} us ({mb / us:4.2f} TB/s)"]
            if M <= mv.MAX_ROWS and mv.triton is not None:
                if args.plain or name not in FUSED:
                    row += sweep("matvec", lambda cfg, w: mv.launch(x, w, *cfg), expected, mv.launch_config(N, K),
                                 mb, copies)
                if name in FUSED:
                    kernel, expected = fused_case(x, weight, **FUSED[name])
                    row += sweep(f"fused {'+'.join(FUSED[name])}", kernel, expected, mv.launch_config(N, K), mb,
                                 copies)
            print("  ".join(row), flush=True)
        del copies
    if not args.topk:
        print("AR-B blocks at batch 1 (2 rows), cold weights and caches:", flush=True)
        for row in layer_chain():
            print("  " + row, flush=True)
    for rows in () if args.chain else (1, 64, 1024, 16384):
        logits = torch.randn(rows, V, device=dev)
        kth = kl.kth_largest_reference(logits, TOP_K)[:, 0]
        assert torch.equal(torch.kthvalue(logits, V - TOP_K + 1, dim=-1).values, kth)
        assert torch.equal(torch.ops.tessera.kth_largest(logits, TOP_K), kth)
        timings = {"topk": lambda: kl.kth_largest_reference(logits, TOP_K),
                   "kthvalue": lambda: torch.kthvalue(logits, V - TOP_K + 1, dim=-1).values,
                   "sort": lambda: torch.sort(logits, dim=-1, descending=True).values[:, TOP_K - 1],
                   "kernel": lambda: torch.ops.tessera.kth_largest(logits, TOP_K)}
        if rows <= 64:          # a decoding step's rows: the kernel's other launches
            block, shipped = kl.launch_config(V)
            timings.update({f"kernel {w}w": lambda w=w: kl.launch(logits, TOP_K, block, w)
                            for w in (4, 8, 16, 32) if w != shipped})
        for name, fn in timings.items():
            if name.startswith("kernel "):
                assert torch.equal(fn(), kth), name
        print(f"top-{TOP_K} threshold of {V}, {rows:5d} rows: "
              + "  ".join(f"{n} {time_us(lambda _, fn=fn: fn(), [logits]):7.1f} us" for n, fn in timings.items()),
              flush=True)


if __name__ == "__main__":
    main()
