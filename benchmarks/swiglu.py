"""Micro-benchmark (GPU): SwiGLU's gate_up matmul and silu(gate) * up, as the compiled sampler runs them
(cuBLAS, then inductor's fused silu*up kernel) vs generator/fused_swiglu.py's Triton kernel (NOTES A31).

    python3 -m benchmarks.swiglu

bf16, x (M, D) against a gate_up weight (2 Hd, D), no grad, at masked-B sampling's shape (batch 64 with CFG:
M = 128 x 257 = 32896, D 768, Hd 2048), batch 1's (M = 2 x 257 = 514) and masked-L training's forward
(batch 256: M = 65792, D 1024, Hd 2752; training keeps the torch path, the row says what the matmul could
reach there). Per row: (a) F.linear + silu*up compiled together (what runs today), (b) F.linear alone
(cuBLAS: the matmul without the epilogue's passes), (c) the kernel autotuned, then (d) each of its configs
(the tl.load ones, then the TMA ones: labelled).
Milliseconds per call among 10 calls captured in one CUDA graph (the sampler replays graphs too, so no
launch latency), and TFLOP/s on the matmul's 2 M D 2Hd FLOPs; the autotuner's pick and the largest
|kernel - (a)|. Prints; not in run_all (the sampling jobs with TESSERA_FUSED_SWIGLU=1 measure the effect).
"""
import torch
import torch.nn.functional as F

from benchmarks.decode_attention import graph_time_us
from generator import fused_swiglu as fs

SHAPES = [("masked-B sample b64", 128 * 257, 768, 2048), ("masked-B sample b1", 2 * 257, 768, 2048),
          ("masked-L train fwd", 256 * 257, 1024, 2752)]


def time_ms(fn) -> float:
    return graph_time_us(fn, replays=20, calls=10) / 1e3


def unfused(x_MD: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformer.SwiGLU's torch path up to the down projection."""
    gate, up = F.linear(x_MD, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def config_rows(x, weight, flops) -> None:
    """Each config launched directly: the tl.load (cp.async) ones, then the TMA ones (``fs.TMA_CONFIGS``, where
    this Triton and GPU have them), labelled "tl.load", "TMA" or "TMA persistent" (a program per SM)."""
    (M, K), N = x.shape, weight.shape[0] // 2
    out = torch.empty(M, N, device="cuda", dtype=x.dtype)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    tma = fs.TMA_CONFIGS if fs.tma_ok(N, K) else []
    if tma:
        fs._ensure_allocator()     # the device-side descriptors' scratch
    for bm, bn, bk, warps, stages, group_m, *rest in fs.CONFIGS + tma:
        persistent = bool(rest and rest[0])

        def run(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, group_m=group_m, tma=bool(rest), p=persistent):
            fs._fused_swiglu_kernel[fs.grid(M, N, bm, bn, p, sms)](
                x, weight, out, M, N, K, x.stride(0), out.stride(0), fs.m_bucket(M), BM=bm, BN=bn, BK=bk,
                GROUP_M=group_m, EVEN_K=K % bk == 0, TMA=tma, PERSISTENT=p, num_warps=warps, num_stages=stages)
        kind = "TMA persistent" if persistent else "TMA" if rest else "tl.load"
        label = f"    {kind:14s} BM {bm:3d} BN {bn:3d} BK {bk} warps {warps} stages {stages} GROUP_M {group_m}"
        try:
            ms = time_ms(run)
            print(f"{label}: {ms:7.3f} ms {flops / ms / 1e9:5.0f} TF/s", flush=True)
        except Exception as e:   # noqa: BLE001 - a config the chip cannot run (shared memory, registers)
            print(f"{label}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})", flush=True)


def shape_rows(label: str, M: int, D: int, Hd: int, compiled) -> None:
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * Hd, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
    flops = 2 * M * D * 2 * Hd
    cands = {"linear+silu*up compiled": lambda: compiled(x, weight),
             "F.linear alone": lambda: F.linear(x, weight),
             "fused kernel": lambda: fs.fused_swiglu(x, weight)}
    row = [f"{label} M={M} D={D} Hd={Hd}"]
    for name, fn in cands.items():
        ms = time_ms(fn)
        row.append(f"{name} {ms:7.3f} ms {flops / ms / 1e9:4.0f} TF/s")
    print(" | ".join(row), flush=True)
    ref, out = compiled(x, weight), fs.fused_swiglu(x, weight)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"  autotuned {fs._tuned_kernel.best_config}; max |kernel - compiled| {err:.4f}, "
          f"equal {(out == ref).float().mean().item():.4f}", flush=True)
    config_rows(x, weight, flops)


def main() -> None:
    if not torch.cuda.is_available() or fs.triton is None:
        print("benchmarks.swiglu needs CUDA and Triton; nothing to measure here")
        return
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {fs.triton.__version__}, bf16, "
          "no grad; ms per call among 10 in one CUDA graph")
    compiled = torch.compile(unfused, dynamic=False)
    with torch.no_grad():
        for label, M, D, Hd in SHAPES:
            shape_rows(label, M, D, Hd, compiled)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
