"""Micro-benchmark (GPU): the masked-B sampler's matmul shapes under the library choices PyTorch offers, to see
whether any shape runs far from the bf16 peak for want of a better cuBLAS kernel (NOTES A67).

    python3 -m benchmarks.matmul_shapes [--workspace none|default] [--json PATH]

bf16, no grad, the sampling forward's Linear layers at batch 64 with CFG (M = 128 x 257 = 32896 rows; the first
step's shared unconditional sequence: 65 x 257 = 16705; the head at half the grid masked: 128 x 128 rows):
qkv, proj, gate_up, down, head (with its bias). Per shape and choice: milliseconds per call among 10 calls in one
CUDA graph (the sampler replays graphs), TFLOP/s on 2 M K N, the cuBLAS kernel that ran (from the profiler), and
whether the output equals the default's bit for bit (a choice the sampler could take without changing ids).
Choices: ``cublas`` (F.linear as the sampler calls it), ``cublaslt`` (``preferred_blas_library("cublaslt")``),
``transposed`` (the product formed as (W x^T)^T, so cuBLAS sees the problem with M and N swapped), and
``tunableop`` (PyTorch's TunableOp timing cuBLASLt's heuristic candidates, where this torch has them: torch 2.11 has
only its Default on CUDA), and for the down projection ``split tail`` (the rows that fill whole waves of 192 x 192
tiles, then the rest as a second matmul: written for the 192 x 192 kernel that A67 first took for down's, whose last
wave would leave most multiprocessors idle at N = 768; cuBLAS runs a 128 x 256 kernel there).
``--workspace none`` first sets what the masked sampling commands set (``launch.prefer_static_matmul_schedules``:
no cuBLAS workspace, NOTES A45); ``default`` keeps PyTorch's. A process setting, so one per run.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F

from benchmarks.common import device_facts, write_json
from benchmarks.decode_attention import graph_time_us
from generator.launch import prefer_static_matmul_schedules

D, HD, VOCAB, ROWS, FIRST_ROWS = 768, 2048, 16384, 128 * 257, 65 * 257
# (name, rows M, in features K, out features N, bias)
SHAPES = [("qkv", ROWS, D, 3 * D, False), ("proj", ROWS, D, D, False), ("gate_up", ROWS, D, 2 * HD, False),
          ("down", ROWS, HD, D, False), ("down first step", FIRST_ROWS, HD, D, False),
          ("head", 128 * 128, D, VOCAB, True)]
CHOICES = ("cublas", "cublaslt", "transposed", "tunableop", "split tail")
TILE = 192                       # the split tail's tile rows and columns (N = 768: 4 tile columns)


def graph_ms(fn, calls: int = 10, replays: int = 20) -> float:
    return graph_time_us(fn, replays=replays, calls=calls) / 1e3


def kernel_name(fn) -> str:
    """The longest GPU kernel of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return "?"
    return max(kernels, key=lambda e: e.device_time_total).name[:70]


def make_call(choice: str, x, w, b):
    if choice == "split tail":      # whole waves of 192 x 192 tiles, then the remaining rows as a matmul of their own
        # rows of TILE x TILE tiles that fill every multiprocessor once
        wave_rows = TILE * (torch.cuda.get_device_properties(x.device).multi_processor_count // 4)
        if b is not None or w.shape[0] != 4 * TILE or x.shape[0] <= wave_rows:
            raise ValueError("only for N = 768 without a bias, past one wave")
        head_rows = x.shape[0] // wave_rows * wave_rows
        out = x.new_empty(x.shape[0], w.shape[0])

        def split():
            torch.mm(x[:head_rows], w.t(), out=out[:head_rows])
            torch.mm(x[head_rows:], w.t(), out=out[head_rows:])
            return out
        return split
    if choice == "transposed":
        if b is None:
            return lambda: torch.mm(w, x.t()).t()
        return lambda: torch.addmm(b[:, None], w, x.t()).t()
    return lambda: F.linear(x, w, b)


def run_choice(choice: str, x, w, b, want: torch.Tensor, flops: float) -> dict:
    lib = torch.backends.cuda.preferred_blas_library()
    try:
        if choice == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        if choice == "tunableop":
            tunable = torch.cuda.tunable
            tunable.enable(True)
            tunable.tuning_enable(True)
        fn = make_call(choice, x, w, b)
        got = fn()
        torch.cuda.synchronize()
        if choice == "tunableop":
            torch.cuda.tunable.tuning_enable(False)       # tuned once above; the graph replays the pick
            picks = [" ".join(str(f) for f in r) for r in torch.cuda.tunable.get_results()]
        ms = graph_ms(fn)
        row = dict(choice=choice, ms=ms, tflops=flops / ms / 1e9, kernel=kernel_name(fn),
                   bitwise_equal=bool(torch.equal(got.contiguous(), want)),
                   max_diff=float((got.float() - want.float()).abs().max()))
        if choice == "tunableop":
            row["tunableop_results"] = picks[-3:]
        return row
    except Exception as e:   # noqa: BLE001 - a choice this torch, GPU or shape does not offer
        return dict(choice=choice, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    finally:
        torch.backends.cuda.preferred_blas_library(lib)
        if choice == "tunableop":
            torch.cuda.tunable.enable(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", choices=("none", "default"), default="none")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.workspace == "none":
        prefer_static_matmul_schedules()
    os.environ.setdefault("PYTORCH_TUNABLEOP_FILENAME", os.path.join(tempfile.mkdtemp(), "tunableop.csv"))
    facts = device_facts()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, cuBLAS workspace: {args.workspace}",
          flush=True)
    torch.manual_seed(0)
    rows = []
    for name, M, K, N, bias in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
        flops = 2 * M * K * N
        with torch.no_grad():
            want = F.linear(x, w, b)
            for choice in CHOICES:
                row = dict(shape=name, M=M, K=K, N=N, workspace=args.workspace, **run_choice(choice, x, w, b, want,
                                                                                             flops))
                rows.append(row)
                if "error" in row:
                    print(f"{name:16s} {choice:10s} n/a ({row['error']})", flush=True)
                else:
                    print(f"{name:16s} {choice:10s} {row['ms']:7.3f} ms {row['tflops']:5.0f} TF/s "
                          f"equal {row['bitwise_equal']!s:5s} {row['kernel']} {row.get('tunableop_results', '')}",
                          flush=True)
    if args.json:
        write_json(args.json, dict(facts=facts, rows=rows))


if __name__ == "__main__":
    main()
