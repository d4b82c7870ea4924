"""Micro-benchmark (GPU): adaLN's residual add + modulated RMSNorm (generator/fused_adaln.py) at VAR-d16's training
shape, the op against the same formula compiled by inductor, and the op's backward under each launch config.

    python3 -m benchmarks.adaln_norm [--batch 128] [--best-out FILE]

x (B, 680, 1024) float32, y / gate / scale / shift bf16, h bf16, as in the compiled training step. Rows: forward
(no autograd) and forward + backward of one residual pair, the op vs ``torch.compile`` of ``fused_adaln.reference``
(inductor's kernels, as the training step ran before NOTES A61); then the op's forward alone for every (rows a
program, warps) and its backward for every (rows a step, rows a program, warps), ms and GB/s of what each must move
(forward 12 bytes an element, backward 18). ``--best-out``: the fastest launches as TESSERA_ADALN_FORWARD=... and
TESSERA_ADALN_BACKWARD=... lines (the variables that set them).
CUDA events, median of 20 after warm-up. Prints; not in run_all (it picks the op's launch; gen_train's
train-var-d16-compile job measures the step).
"""
import argparse
import itertools

import torch

from benchmarks.attention_backends import time_ms
from generator import fused_adaln as fa

EPS = 1e-6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--best-out", help="write the fastest launches here, as environment variable lines")
    args = p.parse_args()
    B, L, D = args.batch, 680, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, L, D, device="cuda", generator=g)
    y = torch.randn(B, L, D, generator=g, **bf)
    mods = torch.randn(B, 6 * D, generator=g, **bf) * 0.5
    shift, scale, gate = mods[:, :D], mods[:, D:2 * D], mods[:, 2 * D:3 * D]
    w = torch.ones(D, device="cuda")
    dh = torch.randn(B, L, D, generator=g, **bf)
    dx_out = torch.randn(B, L, D, device="cuda", generator=g)
    leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, w, scale, shift)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B {B}, L {L}, D {D}, x float32, y/h bf16")

    compiled = torch.compile(lambda x, y, gate, w, scale, shift: fa.reference(x, w, scale, shift, EPS, y, gate,
                                                                             out_dtype=torch.bfloat16))

    def op(x, y, gate, w, scale, shift):
        return fa.adaln_norm(x, w, scale, shift, EPS, y, gate, out_dtype=torch.bfloat16)
    for name, fn in (("inductor", compiled), ("op", op)):
        with torch.no_grad():
            fwd = time_ms(lambda: fn(x, y, gate, w, scale, shift))

        def step(fn=fn):
            x_out, h = fn(*leaves)
            torch.autograd.backward([x_out, h], [dx_out, dh])
        both = time_ms(step)
        print(f"{name:9s} forward {fwd:6.3f} ms | forward + backward {both:6.3f} ms | backward ~{both - fwd:6.3f} ms",
              flush=True)

    fwd_args = (x, y, gate, w, scale, shift, EPS, torch.bfloat16)
    x_out, _, rstd = fa._forward(*fwd_args)
    bwd_args = (dx_out, dh, x_out, rstd, y, gate, w, scale)
    best = {}
    # forward: reads x (4 bytes an element) and y (2), writes x_out (4) and h (2)
    best["TESSERA_ADALN_FORWARD"] = sweep("forward", lambda c: fa._forward(*fwd_args, config=c), fa.FORWARD,
                                          itertools.product((1, 2, 4, 8), (2, 4, 8, 16)), 12 * B * L * D)[0]
    # backward: reads dx_out (4), dh (2), x_out (4), y (2), writes dx (4) and dy (2)
    best["TESSERA_ADALN_BACKWARD"] = sweep("backward", lambda c: fa._backward(*bwd_args, config=c), fa.BACKWARD,
                                           itertools.product((1, 2), (16, 32, 64, 88), (4, 8, 16)), 18 * B * L * D)[0]
    if args.best_out:
        with open(args.best_out, "w") as f:
            f.write("".join(f"{k}={','.join(map(str, v))}\n" for k, v in best.items()))


def sweep(name, run, shipped, configs, moved, reps: int = 1):
    """Time ``run(config)`` for each launch config (``reps`` calls back to back: ``time_ms``'s); print ms and GB/s
    of ``moved`` bytes; return the fastest config and {config: ms}. Also qk_norm_rope's launch sweep."""
    results = {}
    for config in configs:
        try:
            ms = time_ms(lambda: run(config), reps=reps)
        except Exception as e:  # noqa: BLE001 - a launch that does not fit (registers, shared memory) is a row
            print(f"{name} {config}: failed ({str(e).splitlines()[0][:80]})", flush=True)
            continue
        results[config] = ms
        print(f"{name} {config}: {ms:6.3f} ms {moved / ms / 1e6:5.0f} GB/s", flush=True)
    best = min(results, key=results.get)
    print(f"fastest {name}: {best} {results[best]:.3f} ms; shipped {shipped}: "
          f"{results.get(tuple(shipped), float('nan')):.3f} ms", flush=True)
    return best, results


if __name__ == "__main__":
    main()
