"""Micro-benchmark (GPU): the attention sublayer of VAR-d16's training step, forward + backward compiled, with
qk-norm + RoPE as generator/fused_qk_rope.py's op (its backward as a kernel or as torch ops) or as inductor's
kernels, and the op's launches.

    python3 -m benchmarks.qk_norm_rope [--batch 128] [--variants op,op-torch-bwd,torch,op+cd,...] [--out F]
                                       [--best-out F]

The sublayer as the step runs it: x (B, 680, 1024) bf16 -> qkv projection, qk-norm, RoPE, the block-causal SDPA
calls of generator.var.ALONE_TOKENS's groups, output projection, under bf16 autocast; the backward from a fixed
output gradient. A variant is ``<op|op-torch-bwd|torch>[+<inductor option set>]``: option sets ``reads16`` (a
pointwise result stored only once it feeds kernels reading more than 16 buffers, not 4) and ``cd``
(coordinate-descent tuning of each kernel's launch). Per variant: ms per forward + backward (CUDA events, median
of 20), and from one profiled call the ms of the Triton kernels (inductor's and the op's: the part the variants
change; the matmuls and cuDNN's attention stay) with the largest few. Then the op's forward and its backward
kernel alone under each (head rows a program, warps), ms and GB/s of the bytes each must move. Prints a table;
``--out`` writes the rows as JSON. Not in run_all: it picks the op's launches, and gen_train's ``--compile-sweep``
(variants ``qk-torch``, ``qk-bwd-torch``) measures the step.

Session 34 (H100, batch 128): op 1.472 ms of Triton kernels, op-torch-bwd 1.585, torch 1.664; the backward kernel
0.50 ms at (64 rows, 4 warps), the fastest of the 12 launches (NOTES A66).
Session 32 (H100, batch 128, before the op existed): RoPE's backward written as one map over each head (a roll of
the halves, not a split and a cat) was slower, 1.758 vs 1.669 ms of inductor kernels, and 2.370 with
realize_reads_threshold 16 (NOTES A63).
"""
import argparse
import itertools
import json

import torch
import torch._functorch.config

from benchmarks.adaln_norm import sweep
from benchmarks.attention_backends import time_ms

OPTION_SETS = {"": {}, "reads16": {"realize_reads_threshold": 16}, "cd": {"coordinate_descent_tuning": True}}


def sublayer(batch: int):
    """The attention module, its input, output gradient and forward arguments at VAR-d16's shapes."""
    import generator.var as var
    from generator.transformer import Attention, BlockCausal, rope_tables
    scales, D, H = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 1024, 16
    bounds = [0]
    for s in scales:
        bounds.append(bounds[-1] + s * s)
    L = bounds[-1]
    level = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([s * s for s in scales]))
    mask = BlockCausal.from_bounds(bounds, (level[None, :] <= level[:, None]).cuda(), var.ALONE_TOKENS)
    cos, sin = (t.cuda() for t in rope_tables(var.scale_positions(scales), D // H))
    torch.manual_seed(0)
    attn = Attention(D, H, qk_norm=True).cuda()
    x = torch.randn(batch, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, L, D, device="cuda", dtype=torch.bfloat16)
    return attn, x, grad, (cos, sin, mask)


def triton_kernels_ms(fn) -> tuple[float, list[tuple[str, float]]]:
    """GPU ms of the Triton kernels (inductor's ``triton_*``, the op's ``_qkv_*_kernel``) in one ``fn()``, and the
    largest five."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3) for e in prof.key_averages()
               if (e.key.startswith("triton_") or e.key.startswith("_qkv_")) and e.self_device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    return sum(ms for _, ms in kernels), kernels[:5]


def main() -> None:
    from generator import fused_qk_rope as fq
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--variants", default="op,op-torch-bwd,torch")
    p.add_argument("--out")
    p.add_argument("--best-out", help="write the op's fastest launches here, as TESSERA_QK_ROPE_LAUNCH=... and "
                                      "TESSERA_QK_ROPE_BACKWARD_LAUNCH=... lines")
    args = p.parse_args()
    attn, x, grad, (cos, sin, mask) = sublayer(args.batch)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, batch {args.batch}, "
          f"L {x.shape[1]}, D 1024, 16 heads, {len(mask.ends)} SDPA calls", flush=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attn(x, cos, sin, mask_LS=mask)
        out.backward(grad)
        x.grad = None
        attn.zero_grad(set_to_none=True)

    rows = []
    for variant in args.variants.split(","):
        path, _, options = variant.partition("+")
        if path not in ("op", "op-torch-bwd", "torch") or options not in OPTION_SETS:
            raise SystemExit(f"unknown variant {variant!r}: <op|op-torch-bwd|torch>"
                             f"[+{'|'.join(o for o in OPTION_SETS if o)}]")
        fq.ENABLED, fq.BACKWARD_KERNEL = path != "torch", path == "op"
        torch._dynamo.reset()
        # AOT autograd's cache keys on the forward graph: op-torch-bwd would get op's backward back from it
        torch._functorch.config.enable_autograd_cache = False
        fn = torch.compile(step, options=OPTION_SETS[options] or None)
        try:
            ms = time_ms(fn)
            triton_ms, top = triton_kernels_ms(fn)
        except Exception as e:  # noqa: BLE001 - a failed variant is a row
            print(f"{variant:22s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        print(f"{variant:22s} {ms:7.3f} ms forward + backward | Triton kernels {triton_ms:6.3f} ms", flush=True)
        for name, k_ms in top:
            print(f"    {k_ms:6.3f} ms  {name[:110]}")
        rows.append({"variant": variant, "ms": ms, "triton_kernels_ms": triton_ms,
                     "top_kernels": [{"kernel": n, "ms": m} for n, m in top]})
    fq.ENABLED, fq.BACKWARD_KERNEL = True, True
    # the op's forward alone: reads q, k and v, writes q', k', v' (2 bytes an element each) and rstd (4 bytes a row);
    # its backward: reads the three gradients, q and k (and rstd), writes the qkv gradient
    qkv = torch.randn(*x.shape[:2], 3, 16, 64, device="cuda", dtype=torch.bfloat16)
    per = qkv.numel() // 3
    weights = (attn.q_norm.weight, attn.k_norm.weight)
    rstd = fq._forward(qkv, *weights, cos, sin, 1e-6)[3]
    grads = torch.randn_like(qkv).unbind(2)
    launches = list(itertools.product((16, 32, 64, 128), (2, 4, 8)))
    passes = {"forward": (lambda config: fq._forward(qkv, *weights, cos, sin, 1e-6, config=config),
                          (fq.ROWS, fq.WARPS), 2 * 6 * per + 2 * per // 64 * 4),
              "backward": (lambda config: fq._backward(*grads, qkv, *weights, cos, sin, rstd, config=config),
                           (fq.BACKWARD_ROWS, fq.BACKWARD_WARPS), 2 * 8 * per + 2 * per // 64 * 4)}
    best = {}
    for which, (fn, default, moved) in passes.items():
        # 10 calls back to back: the host's work overlaps
        best[which], results = sweep(f"op {which}", fn, default, launches, moved, reps=10)
        rows += [{"variant": f"op {which} {c}", "ms": ms, "gb_per_s": moved / ms / 1e6} for c, ms in results.items()]
    if args.best_out:
        with open(args.best_out, "w") as f:
            f.write(f"TESSERA_QK_ROPE_LAUNCH={best['forward'][0]},{best['forward'][1]}\n"
                    f"TESSERA_QK_ROPE_BACKWARD_LAUNCH={best['backward'][0]},{best['backward'][1]}\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
