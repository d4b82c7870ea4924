"""Micro-benchmark (GPU): attention at the generators' shapes through each SDPA backend, FlexAttention
and VAR's grouped block-causal calls, and which kernel a compiled training step picks.

    python3 -m benchmarks.attention_backends [backends] [var] [compiled] [fused] [split] [ncu]
    (default: all but ncu)

bf16, q/k/v as transposed (B, L, H, K) views (transformer.Attention's layout), head dim 64:
masked-B sampling (128 sequences = batch 64 with CFG, 12 heads, full, forward), masked-L training
(256 sequences, 16 heads, full, forward + backward), each at 257 and 256 tokens (what the class prefix
costs in 128-row tiles), AR-L training (256 tokens, causal) and VAR-d16 training (128 sequences, 16
heads, 680 tokens, block-causal: the bool mask, a FlexAttention BlockMask, ``BlockCausal`` groups);
``fused``: masked-B sampling's qk-norm + RoPE + attention, compiled torch ops vs generator/fused_attention.py;
``split``: the split method's passes (A36);
``ncu``: only a few launches of the fused kernel and SDPA, to profile with Nsight Compute.
Milliseconds per call (CUDA events, median of 20 after warm-up) and TFLOP/s on the attention's
4 L S K FLOPs per head over the pairs the mask keeps (x3.5 with the backward). Then the kernels a
compiled forward + backward through SDPA runs, with the default backend order and with cuDNN first.
Prints; not in run_all (it informs choices; the sampling and training jobs measure their effect).
"""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import profile_ops
from generator.transformer import BlockCausal
from generator.var import ALONE_TOKENS

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:      # torch < 2.5
    flex_attention = None

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
VAR_SIZES = [s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]


def time_ms(fn, iters: int = 20, reps: int = 1) -> float:
    """Median over ``iters`` of the time per call of ``reps`` calls in a row (reps > 1: the host's launch
    work overlaps the GPU's, as in a CUDA graph; a single call also times its launch)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def qkv_views(B, L, H, backward):
    qkv = torch.randn(B, L, 3, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    return qkv, [t.transpose(1, 2) for t in qkv.unbind(2)]


def measure(label, candidates, pairs, B, H, backward, reps: int = 1, one_per_line: bool = False):
    """One row of candidates (``one_per_line``: each printed as it is timed)."""
    flops = 4 * B * H * pairs * 64 * (3.5 if backward else 1.0)
    row = [label]
    for name, fn in candidates.items():
        try:
            out = fn()
            grad = torch.randn_like(out)
            run = (lambda fn=fn: fn().backward(grad)) if backward else fn
            with torch.set_grad_enabled(backward):
                ms = time_ms(run, reps=reps)
            row.append(f"{name} {ms:6.2f} ms {flops / ms / 1e9:4.0f} TF/s")
        except RuntimeError as e:
            row.append(f"{name} n/a ({str(e).splitlines()[0][:50]})")
        if one_per_line:
            print(f"{label} | {row.pop()}", flush=True)
    if not one_per_line:
        print(" | ".join(row), flush=True)


def sdpa(backend, q, k, v, **kw):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def backend_rows(flex) -> None:
    for label, B, H, backward, causal in [("masked-B sample", 128, 12, False, False),
                                          ("masked-L train", 256, 16, True, False),
                                          ("AR-L train", 256, 16, True, True)]:
        for L in ((257, 256) if not causal else (256,)):
            _, (q, k, v) = qkv_views(B, L, H, backward)
            cands = {"default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            cands.update({n: (lambda be=be: sdpa(be, q, k, v, is_causal=causal)) for n, be in BACKENDS.items()})
            if flex is not None and not causal:
                cands["flex"] = lambda: flex(q, k, v)
            measure(f"{label:16s} L={L}", cands, L * L // (2 if causal else 1), B, H, backward)


def var_rows(flex) -> None:
    level = torch.cat([torch.full((n,), i) for i, n in enumerate(VAR_SIZES)]).cuda()
    mask = level[None, :] <= level[:, None]
    bounds = [0]
    for n in VAR_SIZES:
        bounds.append(bounds[-1] + n)
    L = bounds[-1]
    _, (q, k, v) = qkv_views(128, L, 16, True)
    cands = {"bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    if flex is not None:
        def visible(b, h, qi, ki):
            return level[ki] <= level[qi]
        block_mask = create_block_mask(visible, None, None, L, L, device="cuda")
        cands["flex BlockMask"] = lambda: flex(q, k, v, block_mask=block_mask)
        # (64 x 64 mask blocks with 64-row tiles were a row here until session 35: on torch 2.11 (H100, session 33) it
        # hit a CUDA illegal memory access, which poisons the process's CUDA context, so every row after it failed)
    # the thresholds of generator.var.ALONE_TOKENS: 64 (the default: 5 calls), 100 (4), 169 (3: the 91 + 64 + 100
    # tokens of the small scales in one masked call), 256 (2), past L (one masked call over all 680 tokens, NOTES A55)
    for alone in sorted({ALONE_TOKENS, 100, 169, 256, 1024}):
        groups = BlockCausal.from_bounds(bounds, mask, alone)
        attend = torch.compile(groups.attend, dynamic=False)     # the training step runs it compiled
        cands[f"compiled groups (alone >= {alone}: {len(groups.ends)} calls)"] = lambda attend=attend: attend(q, k, v)
    default_groups = BlockCausal.from_bounds(bounds, mask, ALONE_TOKENS)
    cands["groups eager (default)"] = lambda: default_groups.attend(q, k, v)

    def flash_groups():      # the unmasked groups through flash attention, the masked first one memory-efficient
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return default_groups.attend(q, k, v)
    cands["groups eager flash"] = flash_groups
    measure(f"{'VAR-d16 train':16s} L={L}", cands, int(mask.sum()), 128, 16, True, one_per_line=True)
    for name, fn in cands.items():        # what each grouping runs: its kernels' GPU time in one forward + backward
        if name.startswith(("compiled", "flex")):
            grad = torch.ones_like(fn())
            run = lambda fn=fn: fn().backward(grad)     # noqa: E731
            run()                                       # warm, as profile_ops asks
            print(f"  {name}: {profile_ops(run, True, top=6)['top_ops']}", flush=True)


def compiled_kernels(flex=None) -> None:
    """Which attention kernels a compiled forward + backward runs (torch.profiler's kernel names)."""
    from torch.profiler import ProfilerActivity, profile
    qkv, _ = qkv_views(64, 257, 16, True)

    def plain(qkv):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v).float().square().sum()

    def cudnn_first(qkv):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH], set_priority=True):
            return F.scaled_dot_product_attention(q, k, v).float().square().sum()

    for name, fn in (("eager default", plain), ("compiled default", torch.compile(plain)),
                     ("compiled cudnn-first", torch.compile(cudnn_first))):
        try:
            for _ in range(2):
                fn(qkv).backward()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(qkv).backward()
                torch.cuda.synchronize()
            names = sorted({e.key[:70] for e in prof.key_averages()
                            if any(w in e.key.lower() for w in ("attention", "flash", "cudnn", "sdpa", "fmha"))})
            print(f"{name}: {names}", flush=True)
        except Exception as e:   # noqa: BLE001 - a diagnostic: report and go on
            print(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)


def fused_rows(flex=None) -> None:
    """Masked-B sampling's attention from the qkv projection (128 sequences, 12 heads, 257 tokens):
    qk-norm + RoPE + SDPA compiled (what the compiled sampler runs without A29) vs the fused kernel
    (generator/fused_attention.py: its config in use, then every candidate, with the best one named), and SDPA alone on
    ready q, k, v at 257 and 256 tokens for scale. Each timed as 10 calls back to back (GPU time per call,
    the launches overlapped, as in the sampler's CUDA graphs)."""
    from generator import fused_attention as fa
    from generator.transformer import RMSNorm, apply_rope, rope_tables

    B, L, H, K = 128, 257, 12, 64
    qkv = torch.randn(B, L, 3, H, K, device="cuda", dtype=torch.bfloat16)
    q_norm, k_norm = RMSNorm(K).cuda(), RMSNorm(K).cuda()
    positions = torch.stack([torch.arange(256) // 16, torch.arange(256) % 16], dim=-1)
    cos, sin = (t.cuda() for t in rope_tables(positions, K, num_prefix=1))

    def torch_path(qkv):
        q, k, v = qkv.unbind(2)
        q, k = apply_rope(q_norm(q), cos[:, None], sin[:, None]), apply_rope(k_norm(k), cos[:, None], sin[:, None])
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    compiled = torch.compile(torch_path)
    views = [t.transpose(1, 2) for t in qkv.unbind(2)]
    grid_views = [t.transpose(1, 2) for t in qkv[:, 1:].unbind(2)]
    with torch.no_grad():
        ref = compiled(qkv).transpose(1, 2).reshape(B, L, H * K)
        out = fa.fused_attention(qkv, q_norm, k_norm, cos, sin)
        err = (out.float() - ref.float()).abs().max().item()
        cands = {"qk-norm+RoPE+SDPA compiled": lambda: compiled(qkv),
                 "fused kernel": lambda: fa.fused_attention(qkv, q_norm, k_norm, cos, sin),
                 "SDPA alone": lambda: F.scaled_dot_product_attention(*views),
                 "SDPA alone at 256": lambda: F.scaled_dot_product_attention(*grid_views)}
        measure(f"{'masked-B sample':16s} L={L}", cands, L * L, B, H, False, reps=10)
        print(f"fused kernel: config {fa.CONFIG}; max |fused - compiled| {err:.4f}")
        times = {}
        for c in fa.CANDIDATES:
            run = lambda c=c: fa.launch(qkv, q_norm.weight, k_norm.weight, cos, sin, 1e-6, c)   # noqa: E731
            try:
                diff = (run().float() - out.float()).abs().max().item()
                times[c] = time_ms(run, reps=10)
            except Exception as e:      # a config this Triton cannot build (e.g. out of shared memory)
                print(f"  {c}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})", flush=True)
                continue
            print(f"  bm {c.bm:3d} bn {c.bn:3d} warps {c.warps} stages {c.stages} kpre {c.kpre:d} "
                  f"maxnreg {c.maxnreg or '-':>3} | {times[c]:.4f} ms {4 * B * H * L * L * K / times[c] / 1e9:4.0f} "
                  f"TF/s | max |c - config| {diff:.2e}", flush=True)
        if times:
            best = min(times, key=times.get)
            print(f"best: {','.join(str(int(v)) for v in best if v is not None)}  ({times[best]:.4f} ms vs "
                  f"{times.get(fa.CONFIG, float('nan')):.4f} for the config in use)", flush=True)


def split_rows(flex=None) -> None:
    """The split method (NOTES A36) at masked-B sampling's shape (128 sequences, 12 heads, 257 tokens): the whole
    method and the one kernel, then its middle alone (the grid attention with its log-sum-exp, cuDNN and flash, on
    the q/k pass's output), and SDPA over 256 grid queries x 257 keys (no merge needed, a third key tile) for
    scale, and each of the split's passes alone. 10 calls back to back, as ``fused_rows``."""
    from generator import fused_attention as fa
    from generator.transformer import rope_tables

    B, L, H, K = 128, 257, 12, 64
    qkv = torch.randn(B, L, 3, H, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(K, device="cuda") + 0.5
    positions = torch.stack([torch.arange(256) // 16, torch.arange(256) % 16], dim=-1)
    cos, sin = (t.cuda() for t in rope_tables(positions, K, num_prefix=1))
    with torch.no_grad():
        kernel, split = (fa.launch(qkv, weight, weight, cos, sin, 1e-6),
                         fa.launch_split(qkv, weight, weight, cos, sin, 1e-6))
        print(f"max |split - kernel| {(split.float() - kernel.float()).abs().max().item():.4f}", flush=True)
        qr, kr, *prefix = fa.split_prepare(qkv, weight, weight, cos, sin, 1e-6)
        attended = fa.split_attend(qkv, qr, kr)
        v, scale = qkv[:, :, 2].transpose(1, 2), K ** -0.5
        cands = {"kernel": lambda: fa.launch(qkv, weight, weight, cos, sin, 1e-6),
                 "split": lambda: fa.launch_split(qkv, weight, weight, cos, sin, 1e-6),
                 "split: prepare": lambda: fa.split_prepare(qkv, weight, weight, cos, sin, 1e-6),
                 "split: attend": lambda: fa.split_attend(qkv, qr, kr),
                 "split: merge": lambda: fa.split_merge(qkv, *attended, *prefix),
                 "cuDNN+lse 256": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                     qr[:, :, 1:], kr[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False, scale=scale),
                 "flash+lse 256": lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                     qr[:, :, 1:], kr[:, :, 1:], v[:, :, 1:], 0.0, False, False, scale=scale),
                 "SDPA 256q x 257k": lambda: F.scaled_dot_product_attention(qr[:, :, 1:], kr, v)}
        for name, fn in cands.items():
            try:
                print(f"  {name:18s} {time_ms(fn, reps=10):.4f} ms", flush=True)
            except RuntimeError as e:
                print(f"  {name:18s} n/a ({str(e).splitlines()[0][:80]})", flush=True)
        saved = fa.PREP_ROWS, fa.PREP_WARPS, fa.MERGE_ROWS, fa.MERGE_WARPS
        for rows, warps in [(32, 4), (64, 8), (128, 8), (32, 2)]:      # the passes' tile sizes
            fa.PREP_ROWS, fa.PREP_WARPS, fa.MERGE_ROWS, fa.MERGE_WARPS = rows, warps, rows, warps
            qr, kr, *prefix = fa.split_prepare(qkv, weight, weight, cos, sin, 1e-6)
            diff = (fa.launch_split(qkv, weight, weight, cos, sin, 1e-6).float() - split.float()).abs().max().item()
            prep = time_ms(lambda: fa.split_prepare(qkv, weight, weight, cos, sin, 1e-6), reps=10)
            merge = time_ms(lambda: fa.split_merge(qkv, *attended, *prefix), reps=10)
            print(f"  rows {rows:3d} warps {warps}: prepare {prep:.4f} ms, merge {merge:.4f} ms, max |diff| {diff:.4f}",
                  flush=True)
        fa.PREP_ROWS, fa.PREP_WARPS, fa.MERGE_ROWS, fa.MERGE_WARPS = saved


def ncu_launches(flex=None) -> None:
    """A few launches of the fused kernel (its config in use, with the key pass) and of SDPA at 256 grid tokens on
    ready q, k, v, masked-B sampling's shapes, and nothing else: for Nsight Compute (NOTES A33), e.g.
    ``ncu --clock-control none -k regex:"fused_attention|key_prep|sdpa" --launch-skip 3 --launch-count 3
    --section SpeedOfLight --section Occupancy --section WarpStateStats python3 -m benchmarks.attention_backends
    ncu``. Not in the default sections."""
    from generator import fused_attention as fa
    from generator.transformer import rope_tables

    B, L, H, K = 128, 257, 12, 64
    qkv = torch.randn(B, L, 3, H, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(K, device="cuda")
    positions = torch.stack([torch.arange(256) // 16, torch.arange(256) % 16], dim=-1)
    cos, sin = (t.cuda() for t in rope_tables(positions, K, num_prefix=1))
    grid_views = [t.transpose(1, 2) for t in qkv[:, 1:].unbind(2)]
    with torch.no_grad():
        for _ in range(3):
            fa.launch(qkv, weight, weight, cos, sin, 1e-6)
            F.scaled_dot_product_attention(*grid_views)
    torch.cuda.synchronize()
    print(f"launched the fused kernel {fa.CONFIG} and SDPA at 256 tokens three times each")


def main() -> None:
    sections = {"backends": backend_rows, "var": var_rows, "compiled": compiled_kernels, "fused": fused_rows,
                "split": split_rows, "ncu": ncu_launches}
    chosen = sys.argv[1:] or [name for name in sections if name != "ncu"]
    if unknown := set(chosen) - set(sections):
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {list(sections)}")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, head dim 64")
    flex = torch.compile(flex_attention, dynamic=False) if flex_attention is not None else None
    for name in chosen:
        sections[name](flex)


if __name__ == "__main__":
    main()
