"""GPU benchmarks of the three generators' sampling (training: benchmarks/gen_train.py).

    python3 -m benchmarks.generators [--part PART ...] [--smoke] [--rows-out F]

PART: sample-masked (eager, compiled forward, fused), sample-masked-fused (only ``sample(compile=True)``
and the sampler step), sample-masked-torch-attn (``sample(compile=True)`` with the fused attention
kernel of generator/fused_attention.py turned off: the torch ops, cuDNN SDPA), sample-masked-split-attn (its
"split" method: cuDNN over the grid rows, the class key merged in), sample-masked-torch-draw (the same
with generator/fused_draw.py's kernel off: the compiled torch update), sample-masked-cd (the same with inductor's
coordinate-descent tuning), sample-masked-cublaslt (the same with matmuls through cuBLASLt),
sample-masked-autocast-weights
(``sample(compile=True)`` on the pipelines' bf16 Linear weights), sample-masked-no-call-graphs (the same with
``masked.CALL_GRAPHS`` off, and how many ids the call graphs change), sample-masked-max-autotune (the same
with the forward compiled with inductor's max_autotune and persistent TMA templates, and the ids it changes),
sample-masked-inductor-default (the same with the forward under inductor's default options: the residual stream
written every second block, NOTES A43), sample-masked-pdl (the same with the forward's kernels launched with
programmatic dependent launch, NOTES A44), sample-masked-cublas-workspace (the same with cuBLAS's default
workspace: the masked sampling parts otherwise run without one, as `tessera generate` does, NOTES A45),
sample-masked-stored-noise (the same with each step's (B, L, V) Exp(1) noise drawn by exponential_ into memory
and read by the draw, NOTES A46 off), sample-masked-unshared (the same with the first guided step on 2B
sequences, ``masked.SHARE_FIRST_UNCOND`` off, and how many ids a seed changes), sample-masked-host (the same calls
split on the host clock: the time before each graph's replay), sample-ar, sample-ar-autotune / sample-ar-pdl (the
bf16-weight rows with the decode step compiled in max-autotune-no-cudagraphs mode / with its inductor kernels
launched with programmatic dependent launch, NOTES A48), sample-ar-cublas (the same with the step's block
Linear layers through cuBLAS, generator/matvec.py's fused mat-vecs off, NOTES A49, A52), sample-ar-no-pdl (the same
with generator/'s decoding kernels launched without programmatic dependent launch, A57), sample-ar-split (the same
with batch 1's attention split over several programs per sequence and head, the fastest launch of a sweep, A54),
sample-var,
profile-masked / profile-ar / profile-var (where the compiled sampler's GPU time goes), maxbatch.

ImageNet-256 shapes (16x16 grid of a 16384-code f16 tokenizer; VAR: 10 scales of a 4096-code
multi-scale tokenizer), random weights, batch 64, CFG on, bf16 autocast. Models are frozen as the
pipelines freeze them (eval, requires_grad False, fp32 weights under autocast); ``autocast-weights``
rows store the Linear weights in bf16 as the pipelines do on a GPU (``Generator.autocast_weights``:
the same ids, no per-pass cast); ``bf16-weights`` rows cast every weight (VAR; NOTES.md).

Rows: images/s of token generation, or incl. decoding with the tokenizer; batch-1 latency; peak
memory; MFU; the two floors (benchmarks/roofline.py); gap = measured / max(floor).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import statistics
import time
from typing import Callable
from unittest import mock

import torch

from benchmarks import roofline
from benchmarks.common import (H100, RowSink, autocast, compiled, first_call_or_eager, floors, free_memory, job_args,
                               peak_flops, peak_memory_gb, profile_ops, reset_peak_memory, search_max_batch, sync,
                               time_fn, timing)
from benchmarks.setups import build_generator, build_tokenizer, device, frozen, tokenizer_for
from generator.autoregressive import ARGenerator
from generator.launch import STATIC_MATMUL_ENV, prefer_static_matmul_schedules

PARTS = ["sample-masked", "sample-masked-fused", "sample-masked-torch-attn", "sample-masked-split-attn",
         "sample-masked-torch-draw",
         "sample-masked-cd", "sample-masked-cublaslt", "sample-masked-autocast-weights", "sample-masked-no-call-graphs",
         "sample-masked-max-autotune", "sample-masked-inductor-default", "sample-masked-pdl",
         "sample-masked-cublas-workspace", "sample-masked-stored-noise", "sample-masked-unshared", "sample-masked-host",
         "sample-ar", "sample-ar-autotune", "sample-ar-pdl", "sample-ar-cublas", "sample-ar-no-pdl", "sample-ar-split",
         "sample-ar-unfused-query", "sample-ar-fused-query", "sample-var",
         "profile-masked", "profile-ar", "profile-var", "maxbatch"]
# the peers' settings (peers/bench_peers.py): LlamaGen cfg 2.0, top-k 2000; VAR cfg 1.5, top-k 900, top-p 0.96
SAMPLING = {"masked-B": dict(cfg_scale=2.0), "ar-B": dict(cfg_scale=2.0, top_k=2000),
            "var-d16": dict(cfg_scale=1.5, top_k=900, top_p=0.96)}
# masked sampling parts run with cuBLAS's workspace variables unset by ``main`` (the others get STATIC_MATMUL_ENV)
DEFAULT_WORKSPACE_PARTS = {"sample-masked-cublas-workspace"}
FP32_FROZEN = "fp32 (frozen: autocast re-casts every pass)"
BF16_LINEAR = "bf16 Linear (autocast_weights)"      # what the pipelines load on a GPU


class Bench:
    """One generator + its tokenizer under test; ``row`` times a call and adds a row with its floors."""

    def __init__(self, args, sink: RowSink, name: str, classes: int | None = None):
        self.args, self.sink, self.name, self.smoke = args, sink, name, args.smoke
        self.dev = device(args.smoke)
        self.model = frozen(build_generator(name, args.smoke, self.dev))
        self.tok = build_tokenizer(tokenizer_for(name), args.smoke, self.dev)
        self.codec = roofline.vqgan_codec(self.tok)["decode"]
        self.batch = 2 if args.smoke else args.batch
        self.weights = self.model.num_params(non_embedding=True)
        g = torch.Generator().manual_seed(0)
        n = max(self.batch, classes or 1)
        # on the host, as the pipelines and the CLI pass them (a list): the sampler checks them there, where a
        # GPU tensor's check is a device-to-host read (~1.3 ms per call in session 13's trace)
        self.classes = torch.randint(0, self.model.config.num_classes, (n,), generator=g)
        self.gen = torch.Generator(device=self.dev).manual_seed(0)

    @property
    def dtype(self) -> str:
        """The rows' dtype column: the benchmarks run bf16 autocast on CUDA only."""
        return "bf16 autocast" if self.dev.type == "cuda" else "fp32 (cpu smoke)"

    @property
    def is_var(self) -> bool:
        return self.model.config.kind == "var"

    def sample(self, batch: int, **kw):
        opts = {**SAMPLING[self.name], **kw}
        if self.is_var:
            opts["codec"] = self.tok
        with autocast(self.dev):
            return self.model.sample(self.classes[:batch], generator=self.gen, **opts)

    def decode(self, ids):
        with autocast(self.dev):
            return self.tok.decode_scales(ids) if self.is_var else self.tok.decode(ids)

    def row(self, label: str, fn, *, batch: int, compile: str | Callable[[], str], decode: bool, steps: int = 16,
            slow: bool = False, weights: str = FP32_FROZEN, **extra) -> dict:
        """Time ``fn`` as one row. ``compile``: the compile column, or a function giving it, read after the timing
        (a compiled function that falls back to eager in this row's own warm-up then says so)."""
        reset_peak_memory()
        t = time_fn(fn, **timing(self.smoke, slow))
        compile = compile_column(compile)
        c = self.model.config
        m = roofline.sampling(c, self.weights, batch, cfg=True, steps=steps, fp32_weights=weights == FP32_FROZEN)
        flops, bytes_, impl = m["flops"], m["bytes"], m["impl_bytes"]
        if decode:
            d = roofline.codec_floor(self.codec, batch)
            flops, bytes_, impl = flops + d["flops"], bytes_ + d["bytes"], impl + d["impl_bytes"]
        pf = peak_flops()
        return self.sink.add(
            name=f"{self.name} {label}" + (" +decode" if decode else ""), bench="sample", model=self.name,
            params_M=round(self.model.num_params() / 1e6, 1), batch=batch, steps=steps if c.kind == "masked" else None,
            config=SAMPLING[self.name], dtype=self.dtype,
            weights=weights, compile=compile, decode=decode, **t, images_per_s=batch / t["median_s"],
            latency_s=t["median_s"] if batch == 1 else None, mfu=flops / t["median_s"] / pf if pf else None,
            peak_mem_gb=peak_memory_gb(), **floors(flops, bytes_, H100 if self.smoke else None, impl), **extra)

    def guarded(self, label: str, fn, **kw) -> dict | None:
        """``row``, or an error row: one failed measurement must not lose the others."""
        try:
            return self.row(label, fn, **kw)
        except Exception as e:     # noqa: BLE001
            free_memory()
            return self.sink.error(f"{self.name} {label}", e, batch=kw.get("batch"),
                                   compile=compile_column(kw.get("compile")))


def compile_column(status: str | Callable[[], str] | None) -> str | None:
    """A row's compile column: ``status``, or what the function ``status`` says now (after the row's own warm-up)."""
    return status() if callable(status) else status


def compile_forward(b: Bench, mode: str, first_call) -> dict:
    """Route the model's forward (what ``sample`` calls) through torch.compile; the first call
    compiles. On failure the eager forward is restored and the status says why."""
    status = {"compile": f"forward: {mode}"}
    b.model.forward = compiled(b.model.forward, mode, b.smoke)
    if first_call_or_eager(first_call, None, status) is None:
        uncompile_forward(b)
    return status


def uncompile_forward(b: Bench) -> None:
    vars(b.model).pop("forward", None)
    torch._dynamo.reset()


class _Warnings(logging.Handler):
    """Collects the warnings of the named loggers while in a ``with`` block: a built-in compile that
    falls back to eager says so there, and dynamo there when a function hits its recompile limit (it runs
    eagerly from then on). ``status(label)`` is the rows' compile column."""

    def __init__(self, *loggers: str):
        super().__init__(logging.WARNING)
        self.loggers = [logging.getLogger(name) for name in loggers]
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_Warnings":
        for log in self.loggers:
            log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for log in self.loggers:
            log.removeHandler(self)

    def status(self, label: str) -> str:
        """``label``, or why the compile fell back to eager (the last such warning)."""
        failed = [m for m in self.messages if "compile" in m]
        return f"failed -> eager ({' '.join(failed[-1].split())[:160]})" if failed else label


@contextlib.contextmanager
def builtin_compile(smoke: bool):
    """Smoke runs: the torch.compile calls a generator makes itself (``sample(compile=True)``) trace
    with the 'eager' backend, as ``compiled`` does for ours (no code generation on the CPU)."""
    if not smoke:
        yield
        return
    real = torch.compile
    torch.compile = lambda fn, **kw: real(fn, backend="eager", fullgraph=kw.get("fullgraph", False),
                                          dynamic=kw.get("dynamic"))
    try:
        yield
    finally:
        torch.compile = real


def fullgraph(fn, smoke: bool):
    """torch.compile(fn, fullgraph=True), default mode, static shapes ('eager' backend in smoke runs)."""
    if smoke:
        return torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)
    return torch.compile(fn, fullgraph=True, dynamic=False)


# ---- masked ------------------------------------------------------------------------------------
def sample_masked(args, sink: RowSink) -> None:
    b = Bench(args, sink, "masked-B")
    B = b.batch
    for steps in (16, 8):
        b.guarded(f"@{steps} eager", lambda s=steps: b.sample(B, num_steps=s), batch=B, compile="eager",
                  decode=False, steps=steps)
    b.guarded("@16 eager", lambda: b.decode(b.sample(B, num_steps=16)), batch=B, compile="eager", decode=True)
    b.guarded("@16 eager b1", lambda: b.sample(1, num_steps=16), batch=1, compile="eager", decode=False)
    sampler_step(b)
    if args.compile_mode == "none":
        return
    # the forward compiled (static shapes: batch 64 and batch 1 each compile once); the sampler step
    # between forwards stays eager, as sample() runs it by default
    status = compile_forward(b, args.compile_mode, lambda: b.sample(B, num_steps=16))
    for steps in (16, 8):
        for decode in (False, True):
            fn = ((lambda s=steps: b.decode(b.sample(B, num_steps=s))) if decode
                  else (lambda s=steps: b.sample(B, num_steps=s)))
            b.guarded(f"@{steps} compiled", fn, batch=B, decode=decode, steps=steps, **status)
    # static shapes compile one graph per (batch, masked count): batch 64's @16 and @8 leave too few of
    # cache_size_limit's graphs for batch 1's, whose forwards then ran eagerly (225 ms, session 28): start over
    uncompile_forward(b)
    status = compile_forward(b, args.compile_mode, lambda: b.sample(1, num_steps=16))
    b.guarded("@16 compiled b1", lambda: b.sample(1, num_steps=16), batch=1, decode=False, slow=True,
              compile=status["compile"])
    uncompile_forward(b)
    sample_masked_fused(b)


def masked_compile_label(b: Bench) -> str:
    """The compile column of masked-B ``sample(compile=True)`` rows: the forward's compile options, and whether
    each call is replayed as one CUDA graph (``masked.CALL_GRAPHS``: the first call of a shape runs as is, the
    second records it, later ones replay it) or the forward runs graphs of its own."""
    from generator import masked
    opts = masked.MaskedGenerator.forward_compile_options
    forward = opts.get("mode") or ", ".join(f"{k}={v}" for k, v in opts.get("options", {}).items()) or "default"
    if b.dev.type != "cuda":
        label = f"forward: {forward} + update: fullgraph"
    elif masked.CALL_GRAPHS:
        label = f"forward: {forward} + update: fullgraph, the whole call one CUDA graph"
    else:
        label = f"forward: {forward}, its own CUDA graphs (reduce-overhead) + update: fullgraph"
    if b.dev.type == "cuda" and all(os.environ.get(k) == v for k, v in STATIC_MATMUL_ENV.items()):
        label += ", cuBLAS without workspace"
    return label + (" (smoke: eager backend)" if b.smoke else "")


def sample_masked_fused(b: Bench, tag: str = "", weights: str = FP32_FROZEN) -> None:
    """``sample(compile=True)``: the model's own compiled path, the forward through torch.compile
    (reduce-overhead on CUDA) and the fused CFG combine + MaskGIT confidence update through
    torch.compile(fullgraph=True); only the noise is drawn eagerly. A compile failure falls back to
    eager inside the model with a warning, which the rows' compile status reports. ``tag`` ends each
    row's name."""
    B = b.batch
    label = masked_compile_label(b)

    def sample(n: int, steps: int):
        return b.sample(n, num_steps=steps, compile=True)

    with _Warnings("generator.masked", "torch._dynamo") as warn, builtin_compile(b.smoke):
        first = {"compile": label}
        first_call_or_eager(lambda: sample(B, 16), None, first)     # compiles the batch-64 shapes
        rows = [(f"@16 fused-compiled{tag}", lambda: sample(B, 16), B, 16, False),
                (f"@8 fused-compiled{tag}", lambda: sample(B, 8), B, 8, False),
                (f"@16 fused-compiled{tag}", lambda: b.decode(sample(B, 16)), B, 16, True),   # name gets " +decode"
                (f"@16 fused-compiled{tag} b1", lambda: sample(1, 16), 1, 16, False)]        # warm-up compiles b1
        for i, (name, fn, batch, steps, decode) in enumerate(rows):
            b.guarded(name, fn, batch=batch, compile=lambda: warn.status(label), decode=decode, steps=steps,
                      slow=batch == 1, compile_s=first.get("compile_s") if i == 0 else None, weights=weights)


def sampler_step(b: Bench) -> None:
    """One masked sampling step alone (CFG combine + MaskGIT confidence step) on random logits of the
    batch-64 shape: eager; compiled whole (graph break at the host-side schedule); and fused as
    ``sample(compile=True)`` runs it (noise drawn eagerly + ``confidence_update`` compiled fullgraph),
    also the compiled update alone. The sampler's share of each of the 16 steps (NOTES.md)."""
    from generator import fused_draw
    from generator.masked import MaskedSampler, confidence_noise, confidence_update, scheduled_masked_count
    from generator.sampling import cfg_combine_doubled
    m, B = b.model, b.batch
    L, V = m.config.num_tokens, m.config.codebook_size
    t_, s_ = 0.5, 0.4375
    try:
        dtype = torch.bfloat16 if b.dev.type == "cuda" else torch.float32
        logits = torch.randn(2 * B, L, V, device=b.dev, dtype=dtype)
        ids = torch.full((B, L), m.mask_id, dtype=torch.long, device=b.dev)
        n0 = (ids == m.mask_id).sum(1)
        sampler = MaskedSampler(m.schedule, m.mask_id, 16)
        exp_BLV, choice_BL = confidence_noise((B, L, V), s_, b.dev)        # the update alone: noise drawn once
        remain_B = scheduled_masked_count(n0, m.schedule, s_)
        update = fullgraph(confidence_update, b.smoke)

        def step():
            return sampler.step(cfg_combine_doubled(logits, 2.0), ids, t_, s_, None, num_masked_start_B=n0)

        def fused_step(fn=update):
            return sampler.step(logits, ids, t_, s_, None, num_masked_start_B=n0, cfg_scale=2.0, update=fn)

        def fused_update(fn=update):
            return fn(logits, ids, remain_B, exp_BLV, choice_BL, mask_id=m.mask_id, cfg_scale=2.0)

        impl = B * L * V * roofline.MASKED_SAMPLER_BYTES_PER_LOGIT
        variants = [("eager", step, None, "eager"),
                    ("compiled", compiled(step, "default", b.smoke), step, "default"),
                    ("fused-compiled", fused_step, lambda: fused_step(confidence_update),
                     "update: fullgraph (noise eager)"),
                    ("fused-compiled update only", fused_update, lambda: fused_update(confidence_update),
                     "update: fullgraph (noise pre-drawn)")]

        def torch_draw_update():     # the compiled update with the one-pass draw kernel off (NOTES A32): the
            with kernel_off(fused_draw):     # flag is a guarded global, so this traces a graph of its own
                return fused_update()

        variants.append(("fused-compiled update only [torch draw]", torch_draw_update,
                         lambda: fused_update(confidence_update),
                         "update: fullgraph (noise pre-drawn), no draw kernel"))
        for label, fn, eager, mode in variants:
            status = {"compile": mode}
            if eager is not None:
                fn = first_call_or_eager(fn, eager, status)
            t = time_fn(fn, **timing(b.smoke))
            b.sink.add(name=f"masked-B sampler step {label}", bench="sampler-step", model="masked-B", batch=B, **status,
                       **t, **floors(0.0, logits.numel() * logits.element_size(), H100 if b.smoke else None, impl),
                       note="1 of the 16 steps; floor: read the guided logits once; impl bytes: the eager step's")
    except Exception as e:      # noqa: BLE001
        b.sink.error("masked-B sampler step", e, batch=B)
    free_memory()


# ---- autoregressive ----------------------------------------------------------------------------
def sample_ar(args, sink: RowSink, decode_options: dict | None = None, what: str | None = None) -> None:
    """AR-B eager, then ``sample(compile=True)`` with fp32 frozen and with bf16 Linear weights (batch B,
    B + decoding, and batch 1 on the pipelines' bf16 path). The compiled path: the decode step compiled
    (dynamic cache length), its first call per setup uncaptured, the second captures one CUDA graph per
    32 tokens, later calls replay them (``timing``'s two warm-ups). ``decode_options``: torch.compile arguments
    of the step added to ``ARGenerator.decode_compile_options`` (bf16 weights only, rows named ``[what]``)."""
    b = Bench(args, sink, "ar-B")
    B, on_gpu = b.batch, b.dev.type == "cuda"
    variant = decode_options is not None
    tag = f" [{what}]" if variant else ""
    saved = ARGenerator.decode_compile_options
    if variant:
        ARGenerator.decode_compile_options = {**saved, **decode_options}
    with _Warnings("generator.autoregressive", "torch._dynamo") as warn:
        def status() -> str:
            if not on_gpu:
                return "eager (the built-in compile is CUDA-only)"
            return warn.status(f"built-in decode step ({what or 'default mode'}) + CUDA graph per 32 tokens")

        if not variant:
            b.guarded("eager", lambda: b.sample(B, compile=False), batch=B, compile="eager", decode=False, slow=True)
        try:
            for suffix, weights in (("", None), (" autocast-weights", torch.bfloat16)):
                if weights is None and variant:
                    continue
                if weights is not None:       # what the pipelines load on a GPU: the same ids, no per-step cast
                    if not on_gpu:            # needs bf16 autocast, which the benchmarks turn on on CUDA only
                        continue
                    b.model.autocast_weights(weights)
                    # compile afresh (the model drops its compiled step; dynamo's caches go too): replaying the
                    # step compiled for the fp32 weights after they were freed faulted (illegal address, H100,
                    # torch 2.11); the pipelines cast before any compile
                    torch._dynamo.reset()
                    free_memory()
                wlabel = BF16_LINEAR if weights is not None else FP32_FROZEN
                status_first = {"compile": status()}
                if first_call_or_eager(lambda: b.sample(B, compile=on_gpu), None, status_first) is None:
                    sink.add(name=f"ar-B compiled{suffix}{tag}", batch=B, error=status_first["compile"])
                    continue
                variants = [(f"compiled{suffix}{tag}", B, False), (f"compiled{suffix}{tag}", B, True)]
                if weights is not None or not on_gpu:   # batch 1 recompiles: once, on the pipelines' path
                    variants.append((f"compiled{suffix}{tag} b1", 1, False))
                for label, batch, decode in variants:
                    fn = (lambda n=batch: b.decode(b.sample(n, compile=on_gpu))) if decode else \
                        (lambda n=batch: b.sample(n, compile=on_gpu))
                    b.guarded(label, fn, batch=batch, compile=status, decode=decode, slow=True, weights=wlabel,
                              compile_s=status_first.get("compile_s") if batch == B and not decode else None)
                if weights is not None:     # the ids of the rows' path under one seed, to compare across jobs
                    for n in (B, 1):
                        what = f"autocast-weights{tag}" + (" b1" if n == 1 else "")
                        try:
                            b.gen.manual_seed(1234)
                            add_digest_row(b, sink, None, what, b.sample(n, compile=True))
                        except Exception as e:  # noqa: BLE001
                            sink.error(f"ar-B ids digest: {what}", e, batch=n)
        finally:
            ARGenerator.decode_compile_options = saved


def sample_ar_cublas(args, sink: RowSink) -> None:
    """``sample-ar``'s bf16-weight rows with generator/matvec.py's few-rows kernel off (NOTES A49, A52): each cached
    step's Linear layers through cuBLAS and the norms and residual adds as inductor's kernels, rows named
    ``[cuBLAS]``, to pair with ``sample-ar``'s rows and ids digest of the same run."""
    from generator import matvec
    with kernel_off(matvec):
        sample_ar(args, sink, decode_options={}, what="cuBLAS")


def sample_ar_no_pdl(args, sink: RowSink) -> None:
    """``sample-ar``'s bf16-weight rows with generator/'s decoding kernels (the mat-vecs, the one-query attention)
    launched without programmatic dependent launch (``launch.PDL`` off, NOTES A57), rows named ``[no PDL]``, to
    pair with ``sample-ar``'s rows and ids digest of the same run."""
    from generator import launch
    with mock.patch.object(launch, "PDL", False):
        sample_ar(args, sink, decode_options={}, what="no PDL")


def sample_ar_new_query(args, sink: RowSink, fused: bool) -> None:
    """``sample-ar``'s bf16-weight rows with the cached step's qk-norm, RoPE and cache write inside the attention
    kernel (``fused``: ``decode_attention.NEW_QUERY``, NOTES A56, the default where the attention launch is split:
    batch 1-4 under CFG; batch 64's rows are the same either way) or outside it (inductor's kernel of their own,
    then ``attend_one_query``), rows named ``[new query fused]`` / ``[new query apart]``: the two jobs pair with
    each other and with ``sample-ar``'s rows and ids digest of the same run."""
    from generator import decode_attention as da
    with mock.patch.object(da, "NEW_QUERY", fused):
        sample_ar(args, sink, decode_options={}, what="new query " + ("fused" if fused else "apart"))


def sample_ar_split(args, sink: RowSink) -> None:
    """``sample-ar``'s bf16-weight rows with the cached step's attention split at batch 1-4 (NOTES A54): first each
    split launch of ``benchmarks.decode_attention.SPLIT_CONFIGS`` and the one in use timed in a CUDA graph at batch
    1's shape (2 x 12 sequences, 160 and 256 cache slots: the average and the longest step), then the step's rows
    with the fastest (``decode_attention.FEW``), named ``[split attention S/W/N]``, to pair with ``sample-ar``'s
    rows and ids digest of the same run (batch 64 takes the unsplit launch either way)."""
    from benchmarks.decode_attention import HEAD_DIM, HEADS, SPLIT_CONFIGS, graph_time_us
    from generator import decode_attention as da
    best = da.FEW
    if torch.cuda.is_available() and not args.smoke:
        cache_k, cache_v = (torch.randn(2, HEADS, 257, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        q = torch.randn(2, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        masks = {S: torch.ones(1, S, dtype=torch.bool, device="cuda") for S in (160, 256)}   # outside the graphs
        times = {}
        for config in [da.FEW, *SPLIT_CONFIGS]:
            with mock.patch.object(da, "FEW", config):
                times[config] = [graph_time_us(lambda S=S: torch.ops.tessera.attend_one_query(
                    q, cache_k[:, :, :S], cache_v[:, :, :S], masks[S]), 100, 20) for S in masks]
        best = min(times, key=lambda c: sum(times[c]))
        sink.add(name="ar-B decode attention launches b1", bench="kernel", model="ar-B", batch=1,
                 launches={"/".join(map(str, c)): [round(t, 2) for t in ts] for c, ts in times.items()},
                 chosen="/".join(map(str, best)), in_use="/".join(map(str, da.FEW)),
                 note="us per call among 20 in a CUDA graph at 160 and 256 slots; slots per iteration/warps/splits")
    with mock.patch.object(da, "FEW", best):
        sample_ar(args, sink, decode_options={}, what="split attention " + "/".join(map(str, best)))


# ---- next-scale (VAR) ----------------------------------------------------------------------------
def sample_var(args, sink: RowSink) -> None:
    """VAR-d16 eager, then ``sample(compile=True)`` (one compiled forward for every scale, dynamic shapes,
    CUDA graphs) with the decoder compiled as the pipeline's compile option does; incl. decoding, as the
    peer's number is."""
    b = Bench(args, sink, "var-d16")
    B = b.batch
    b.guarded("eager", lambda: b.sample(B), batch=B, compile="eager", decode=False)
    b.guarded("eager", lambda: b.decode(b.sample(B)), batch=B, compile="eager", decode=True)
    b.guarded("eager b1", lambda: b.decode(b.sample(1)), batch=1, compile="eager", decode=True)
    if args.compile_mode != "none":
        from pipelines.generate import compile_decoder
        with _Warnings("generator.var", "pipelines.generate", "torch._dynamo") as warn, builtin_compile(b.smoke):
            first = {"compile": "scale forward: dynamic"}
            first_call_or_eager(lambda: b.sample(B, compile=True), None, first)   # compiles both graphs
            status = warn.status("scale forward: reduce-overhead, dynamic")
            b.guarded("compiled", lambda: b.sample(B, compile=True), batch=B, compile=status, decode=False,
                      compile_s=first.get("compile_s"))
            compile_decoder(b.tok)
            first_call_or_eager(lambda: b.decode(b.sample(B, compile=True)), None, {})  # compiles the decoder
            status += " + decoder: channels_last, default"
            b.guarded("compiled", lambda: b.decode(b.sample(B, compile=True)), batch=B, compile=status,
                      decode=True)
            b.guarded("compiled b1", lambda: b.decode(b.sample(1, compile=True)), batch=1, compile=status,
                      decode=True, slow=True)    # its warm-up recompiles the decoder for batch 1
    frozen(b.model, torch.bfloat16)
    free_memory()
    b.guarded("eager bf16-weights", lambda: b.decode(b.sample(B)), batch=B, compile="eager", decode=True,
              weights="bf16")


def profile_sampling(args, sink: RowSink, name: str) -> None:
    """torch.profiler over one sampling call (16 steps for masked) at batch 64 and at batch 1, on the
    fastest shipped path (``sample(compile=True)`` on a GPU, Linear weights in bf16 as the pipelines
    store them; its warm-up call compiles): the operators
    that take the GPU time, and GPU-busy vs wall time (a launch-bound loop shows a low busy fraction).
    Kernels replayed inside CUDA graphs are listed as the profiler reports them."""
    b = Bench(args, sink, name)
    on_gpu = b.dev.type == "cuda"
    if on_gpu:
        b.model.autocast_weights()    # the pipelines' path on a GPU
    steps = {"num_steps": 16} if b.model.config.kind == "masked" else {}
    label = "compiled" if on_gpu else "eager"
    for batch in (b.batch, 1):
        run = lambda n=batch: b.sample(n, compile=on_gpu, **steps)   # noqa: E731
        run()                                                        # warm-up: compile, allocator, cuBLAS plans
        run()                                                        # AR: the second call captures its graphs
        sink.add(name=f"{name} profile {label} b{batch}", bench="profile", model=name, batch=batch, compile=label,
                 **profile_ops(run, on_gpu, top=40, trace=f"{name}-b{batch}.json"))


def sample_masked_fused_only(args, sink: RowSink) -> None:
    b = Bench(args, sink, "masked-B")
    sampler_step(b)
    sample_masked_fused(b)


def sample_masked_autocast_weights(args, sink: RowSink, tag: str = "") -> Bench:
    """``sample(compile=True)`` with the Linear weights stored in bf16 (``Generator.autocast_weights``), as the
    pipelines load a generator on a GPU: the ids of fp32 frozen weights under autocast, without the per-forward
    cast of every weight (NOTES A15). A process of its own, so no graph compiled for fp32 weights outlives them.
    On the CPU (smoke) the weights stay fp32: the benchmarks turn bf16 autocast on on CUDA only. ``tag`` ends
    each row's name after " autocast-weights"; returns the Bench."""
    b, weights = autocast_weights_bench(args, sink)
    sample_masked_fused(b, tag=" autocast-weights" + tag, weights=weights)
    for steps in (16, 8):
        add_digest_row(b, sink, steps, f"autocast-weights{tag}", seeded_ids(b, steps))
    return b


def autocast_weights_bench(args, sink: RowSink) -> tuple[Bench, str]:
    """A masked-B Bench with its Linear weights stored in bf16 on CUDA (fp32 on the CPU, where the benchmarks run
    no autocast), and the rows' weights column for them."""
    b = Bench(args, sink, "masked-B")
    if b.dev.type != "cuda":
        return b, FP32_FROZEN
    b.model.autocast_weights(torch.bfloat16)
    return b, BF16_LINEAR


def seeded_ids(b: Bench, steps: int) -> torch.Tensor:
    """One masked-B ``sample(compile=True)`` call at the bench's batch under the ids rows' seed."""
    b.gen.manual_seed(1234)
    return b.sample(b.batch, num_steps=steps, compile=True)


def add_digest_row(b: Bench, sink: RowSink, steps: int | None, what: str, ids: torch.Tensor) -> None:
    """A ``sample-ids`` row named "{model} @{steps} ids digest: {what}" ("{model} ids digest: {what}" for AR and
    VAR, steps None): the sha256 of ``ids`` (int64 bytes), so runs in other processes, settings or machines can
    tell whether a seed gave the same ids (the weights are seeded: ``setups.build_generator``)."""
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
    label = b.name if steps is None else f"{b.name} @{steps}"
    sink.add(name=f"{label} ids digest: {what}", bench="sample-ids", model=b.name, batch=ids.shape[0],
             steps=steps, config=SAMPLING[b.name], compile="sample(compile=True)", dtype=b.dtype,
             ids_sha256=digest, note=f"sha256 {digest} of the ids under seed 1234")
    print(f"{label} {what}: ids sha256 {digest}", flush=True)


def add_ids_row(b: Bench, sink: RowSink, steps: int, what: str, ids: torch.Tensor, reference: torch.Tensor) -> None:
    """A ``sample-ids`` row named "masked-B @{steps} ids: {what}": how many of ``ids`` differ from ``reference``."""
    differ, total = int((ids != reference).sum()), reference.numel()
    sink.add(name=f"masked-B @{steps} ids: {what}", bench="sample-ids", model="masked-B", batch=b.batch, steps=steps,
             config=SAMPLING["masked-B"], compile="sample(compile=True)", dtype=b.dtype, ids_differ=differ,
             ids_total=total, note=f"{differ} of {total} ids differ under one seed")
    print(f"@{steps} {what}: {differ} of {total} ids differ under one seed", flush=True)


def sample_masked_autocast_weights_without_call_graphs(args, sink: RowSink) -> None:
    """``sample-masked-autocast-weights`` with ``masked.CALL_GRAPHS`` off (NOTES A39: the forward's own CUDA graphs,
    the rest of each step launched kernel by kernel, as before), to pair with that job's rows of the same run;
    then the ids of one @16 and one @8 call under one seed without the call graphs, and with them: the call
    run as is (the first of its shape), recorded and replayed, replayed; how many differ from the first."""
    from generator import masked
    with mock.patch.object(masked, "CALL_GRAPHS", False):
        b = sample_masked_autocast_weights(args, sink, tag=" [no call graphs]")
    for steps in (16, 8):
        ids = []
        for graphs in (False, True, True, True):
            with mock.patch.object(masked, "CALL_GRAPHS", graphs):
                ids.append(seeded_ids(b, steps))
        for name, other in zip(("call graphs: the first call, as is", "recorded and replayed", "replayed"), ids[1:]):
            add_ids_row(b, sink, steps, f"{name} vs no call graphs", other, ids[0])


def sample_masked_forward_options(args, sink: RowSink, options: dict, what: str) -> None:
    """``sample-masked-autocast-weights`` with the forward compiled with ``options`` as
    ``MaskedGenerator.forward_compile_options`` (the call graphs on), its rows' names ending in " [forward
    {what}]", to pair with that job's rows of the same run; then the ids of one @16 and one @8 call under one
    seed with this forward and the default one, and how many differ. Smoke runs keep the default options."""
    from generator.masked import MaskedGenerator
    default = MaskedGenerator.forward_compile_options
    options = default if args.smoke else options
    with mock.patch.object(MaskedGenerator, "forward_compile_options", options):
        b = sample_masked_autocast_weights(args, sink, tag=f" [forward {what}]")
    for steps in (16, 8):
        ids = []
        for opts in (options, default):
            with mock.patch.object(MaskedGenerator, "forward_compile_options", opts):
                for _ in range(2):                # as is, then recorded: the ids of the graph the rows timed
                    ids.append(seeded_ids(b, steps))
        add_ids_row(b, sink, steps, f"forward {what} vs default", ids[1], ids[3])


def default_forward_options_and(**options) -> dict:
    """``MaskedGenerator.forward_compile_options`` with these inductor ``options`` added (A43's stays on)."""
    from generator.masked import MaskedGenerator
    return {"options": {**MaskedGenerator.forward_compile_options.get("options", {}), **options}}


def sample_masked_max_autotune(args, sink: RowSink) -> None:
    """The forward compiled with inductor's ``max_autotune`` and its persistent TMA matmul templates (NOTES A41; no
    coordinate-descent tuning, which gained nothing in ``sample-masked-cd``): inductor times Triton matmul
    templates against cuBLAS per shape and, where a template wins, may fuse pointwise neighbours into it (SwiGLU's
    silu*up as the down projection's prologue, residual adds as epilogues); other matmul kernels may round
    differently, so the ids are counted."""
    options = default_forward_options_and(**{"max_autotune": True, "coordinate_descent_tuning": False,
                                             "triton.enable_persistent_tma_matmul": True})
    sample_masked_forward_options(args, sink, options, "max-autotune")


def sample_masked_cublas_workspace(args, sink: RowSink) -> None:
    """``sample-masked-autocast-weights`` with cuBLAS's default workspace (NOTES A45 off: ``main`` sets no
    ``STATIC_MATMUL_ENV`` for this part), to pair with that job's rows of the same run; the ids digests of the two
    jobs tell whether the other matmul kernels changed any id."""
    sample_masked_autocast_weights(args, sink, tag=" [cuBLAS workspace]")


def sample_masked_stored_noise(args, sink: RowSink) -> None:
    """``sample-masked-autocast-weights`` with ``fused_draw.FRESH_NOISE`` off (NOTES A46 off): each step draws its
    (B, L, V) Exp(1) noise with exponential_ into memory (1.07 GB at batch 64) and the draw kernel reads it back, to
    pair with that job's rows of the same run; the ids digests of the two jobs tell whether any id changed (the
    same numbers; log p summed in another order)."""
    from generator import fused_draw
    with mock.patch.object(fused_draw, "FRESH_NOISE", False):
        sample_masked_autocast_weights(args, sink, tag=" [stored noise]")


def sample_masked_pdl(args, sink: RowSink) -> None:
    """The forward's inductor kernels launched with programmatic dependent launch (``triton.enable_pdl``, Hopper):
    each may start while the kernel before it finishes, waiting (``gdc_wait``) only before it reads that
    kernel's output; ~2000 kernel boundaries per @16 call sit ~1 us apart in the call graph (NOTES A44). The same
    kernels, so the ids should not differ."""
    sample_masked_forward_options(args, sink, default_forward_options_and(**{"triton.enable_pdl": True}), "PDL")


def sample_masked_inductor_default(args, sink: RowSink) -> None:
    """The forward compiled with inductor's default options (NOTES A43 off): its ``realize_reads_threshold`` of 4
    writes the fp32 residual stream once every second block, where the default forward options write it once per
    block; the same float32 sums, so the ids should not differ."""
    sample_masked_forward_options(args, sink, {}, "inductor defaults")


def sample_masked_host(args, sink: RowSink) -> None:
    """``sample-masked-autocast-weights``'s calls split on the host clock (NOTES A42): for each replayed call, the
    wall time from the call to the start of its graph's replay (the caller's code, the sampler's checks, the class
    ids' copy, the storage key: the GPU idles through it, as the previous call's synchronize left it) and the
    whole call with its synchronize, timed as ``time_fn`` times the sampling rows; medians over the timed calls,
    at @16 and @8 (the bench's batch) and @16 at batch 1. Without CUDA (smoke) no call is replayed and the split
    stays empty."""
    b, weights = autocast_weights_bench(args, sink)
    graphs = b.model._sampling_fns(compile=True)[4]
    t = timing(args.smoke)
    for batch, steps in ((b.batch, 16), (b.batch, 8), (1, 16)):
        for _ in range(t["warmup"] + 1):          # the first call compiles, the second records, the third replays
            b.sample(batch, num_steps=steps, compile=True)
        sync()
        totals, before = [], []
        for _ in range(max(t["iters"], 12) if not args.smoke else 1):
            t0 = time.perf_counter()
            b.sample(batch, num_steps=steps, compile=True)
            sync()
            totals.append(time.perf_counter() - t0)
            if graphs.replay_started_at is not None and graphs.replay_started_at > t0:
                before.append(graphs.replay_started_at - t0)
        host = statistics.median(before) if before else None
        note = (f"{host * 1e3:.3f} ms from the call to its replay" if host is not None
                else "no replay (the call graphs run on CUDA only)")
        sink.add(name=f"masked-B @{steps} host split" + (" b1" if batch == 1 else ""), bench="sample-host",
                 model="masked-B", batch=batch, steps=steps, config=SAMPLING["masked-B"],
                 compile=masked_compile_label(b), dtype=b.dtype, weights=weights, median_s=statistics.median(totals),
                 host_before_replay_s=host, iters=len(totals), note=note)
        print(f"@{steps} batch {batch}: {statistics.median(totals) * 1e3:.2f} ms per call, {note}", flush=True)


def sample_masked_unshared(args, sink: RowSink) -> None:
    """``sample(compile=True)`` with the first guided step on all 2B sequences (``masked.SHARE_FIRST_UNCOND`` off,
    NOTES A37), to pair with ``sample-masked-fused``'s rows of the same run; then the ids of one @16 and one @8
    call under one seed with the sharing on and off, and how many of them differ (the forward's kernels at
    B + 1 vs 2B sequences may round differently)."""
    from generator import masked
    b = sample_masked_under(args, sink, mock.patch.object(masked, "SHARE_FIRST_UNCOND", False), " [first step on 2B]")
    for steps in (16, 8):
        ids = {}
        for share in (True, False):
            with mock.patch.object(masked, "SHARE_FIRST_UNCOND", share):
                ids[share] = seeded_ids(b, steps)
        add_ids_row(b, sink, steps, "first step on B + 1 vs 2B sequences", ids[False], ids[True])


def sample_masked_torch_attention(args, sink: RowSink) -> None:
    """``sample(compile=True)`` with the fused attention kernel off (NOTES A29): qk-norm and RoPE compiled,
    then SDPA (cuDNN), as before the kernel; to pair with ``sample-masked-fused``'s rows of the same run."""
    from generator import fused_attention
    sample_masked_under(args, sink, kernel_off(fused_attention), " [torch attention]")


def sample_masked_split_attention(args, sink: RowSink) -> None:
    """``sample(compile=True)`` with the attention's "split" method (NOTES A36: a q/k pass, cuDNN over the grid rows
    with its log-sum-exp, a merge pass) instead of the one kernel; to pair with ``sample-masked-fused``'s rows."""
    from generator import fused_attention
    sample_masked_under(args, sink, mock.patch.object(fused_attention, "METHOD", "split"), " [split attention]")


def sample_masked_torch_draw(args, sink: RowSink) -> None:
    """``sample(compile=True)`` with the one-pass draw kernel off (NOTES A32): the compiled torch update's
    guidance, draw and confidence; to pair with ``sample-masked-fused``'s rows of the same run."""
    from generator import fused_draw
    sample_masked_under(args, sink, kernel_off(fused_draw), " [torch draw]")


def sample_masked_coordinate_descent(args, sink: RowSink) -> None:
    """``sample(compile=True)`` with inductor's coordinate-descent tuning of the kernels it generates (the fused
    norms and residual adds, silu*up, the update's ranking: ~50 ms of the @16 batch's GPU time, NOTES "the GPU
    timeline"); to pair with ``sample-masked-fused``'s rows of the same run. Compiles take longer."""
    import torch._inductor.config as inductor_config
    sample_masked_under(args, sink, inductor_config.patch(coordinate_descent_tuning=True),
                        " [inductor coordinate descent]")


def sample_masked_cublaslt(args, sink: RowSink) -> None:
    """``sample(compile=True)`` with PyTorch's matmuls through cuBLASLt instead of cuBLAS: in session 12's trace
    every cuBLAS matmul of the @16 call came with a memset and ~3 us of gaps around it (~3.3 ms per call, NOTES
    "the GPU timeline"); to pair with ``sample-masked-fused``'s rows of the same run."""
    sample_masked_under(args, sink, blas_library("cublaslt"), " [cuBLASLt]")


def sample_masked_under(args, sink: RowSink, context, tag: str) -> Bench:
    """``sample_masked_fused`` inside ``context`` (a setting changed for this part's rows only: a later part of
    the same process runs the default path again), its rows' names ending in ``tag``; returns its Bench."""
    b = Bench(args, sink, "masked-B")
    with context:
        sample_masked_fused(b, tag=tag)
    return b


def kernel_off(kernel_module):
    """A context with ``kernel_module.ENABLED`` (one of generator/'s Triton kernels) False, restored after."""
    return mock.patch.object(kernel_module, "ENABLED", False)


@contextlib.contextmanager
def blas_library(name: str):
    """``torch.backends.cuda.preferred_blas_library(name)`` inside, the previous choice restored after."""
    saved = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(saved)


# ---- largest batch ------------------------------------------------------------------------------
def ar_probe(b: Bench, batch: int) -> None:
    """AR's peak memory without 256 steps: the whole static KV cache, the prefill and two guided
    top-k decode steps (every later step needs the same memory)."""
    from generator.sampling import cfg_combine_doubled, sample_logits
    m = b.model
    cls = b.classes[:batch]
    cls2 = torch.cat([cls, torch.full_like(cls, m.config.null_class)])
    m.backbone.setup_caches(2 * batch, m.config.num_tokens, m.head.weight.dtype, b.dev)
    try:
        with autocast(b.dev), torch.no_grad():
            logits = m.prefill(cls2)
            pos = torch.zeros(1, dtype=torch.long, device=b.dev)
            for _ in range(2):
                ids, _ = sample_logits(cfg_combine_doubled(logits.float(), 2.0), top_k=2000)
                pos = pos + 1
                logits = m.decode_one_token(torch.cat([ids, ids]), pos, cls2)
    finally:
        m.backbone.remove_caches()


def maxbatch(args, sink: RowSink) -> None:
    """Largest batch that samples without running out of memory, as the pipeline runs (eager, fp32
    frozen weights, CFG): token generation of each family, and the f16 decoder alone. Doubling from
    64, then bisection, at most 10 probes. Smoke runs simulate a capacity of 6 images."""
    start, limit, attempts = (2, 16, 5) if args.smoke else (args.batch, 16384, 10)
    benches: dict[str, Bench] = {}
    for name in ("masked-B", "ar-B", "var-d16", "f16-decode"):
        try:
            model_name = "masked-B" if name == "f16-decode" else name     # the f16 tokenizer comes with masked-B
            b = benches.get(model_name) or Bench(args, sink, model_name, classes=limit)
            benches = {model_name: b}                                       # keep one model on the GPU at a time
            g = b.tok.grid_size
            probe = {"masked-B": lambda n: b.sample(n, num_steps=2),      # a step's peak: the same at 2 or 16 steps
                     "ar-B": lambda n: ar_probe(b, n),
                     "var-d16": lambda n: b.sample(n),
                     "f16-decode": lambda n: b.decode(torch.randint(0, b.tok.codebook_size, (n, g, g), device=b.dev)),
                     }[name]
            if args.smoke:
                probe = _simulated_capacity(probe, 6)
            res = search_max_batch(probe, start, limit, attempts)
            peak = next((p for n, ok, p in res["attempts"] if ok and n == res["max_batch"]), None)
            sink.add(name=f"{name} max batch", bench="maxbatch", model=name, batch=res["max_batch"], compile="eager",
                     max_batch=res["max_batch"], first_oom=res["first_oom"], attempts=res["attempts"],
                     peak_mem_gb=peak, note=("simulated capacity 6 (smoke)" if args.smoke else
                                             "f16 decoder alone" if name == "f16-decode" else "token generation")
                     + ("; reached the search limit" if res["capped_at_limit"] else ""))
        except Exception as e:   # noqa: BLE001
            sink.error(f"{name} max batch", e)
        free_memory()


def _simulated_capacity(probe, capacity: int):
    def run(n: int) -> None:
        if n > capacity:
            raise torch.cuda.OutOfMemoryError(f"simulated: smoke capacity is {capacity}")
        probe(n)
    return run


def main() -> None:
    # reduce-overhead: CUDA graphs for batch 1 (launch-bound) at a default-mode compile cost; try
    # --compile-mode max-autotune-no-cudagraphs for batch 64 when there is time (NOTES.md)
    args = job_args(__doc__.splitlines()[0], PARTS, compile_mode="reduce-overhead")
    if all(p.startswith(("sample-masked", "profile-masked")) and p not in DEFAULT_WORKSPACE_PARTS for p in args.part):
        prefer_static_matmul_schedules()      # before the process's first matmul, as `tessera generate` does
    # a second batch size recompiles static kernels (not a dynamic-shape graph): each row is timed on
    # the kernels a fixed-batch user gets; AR's decode step compiles for 2 batch sizes x 2 dtypes
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    jobs = {"sample-masked": sample_masked, "sample-masked-fused": sample_masked_fused_only,
            "sample-masked-torch-attn": sample_masked_torch_attention,
            "sample-masked-split-attn": sample_masked_split_attention,
            "sample-masked-torch-draw": sample_masked_torch_draw,
            "sample-masked-cd": sample_masked_coordinate_descent,
            "sample-masked-cublaslt": sample_masked_cublaslt,
            "sample-masked-autocast-weights": sample_masked_autocast_weights,
            "sample-masked-no-call-graphs": sample_masked_autocast_weights_without_call_graphs,
            "sample-masked-max-autotune": sample_masked_max_autotune,
            "sample-masked-inductor-default": sample_masked_inductor_default, "sample-masked-pdl": sample_masked_pdl,
            "sample-masked-cublas-workspace": sample_masked_cublas_workspace,
            "sample-masked-stored-noise": sample_masked_stored_noise,
            "sample-masked-unshared": sample_masked_unshared, "sample-masked-host": sample_masked_host,
            "sample-ar": sample_ar,
            "sample-ar-autotune": functools.partial(sample_ar, decode_options={"mode": "max-autotune-no-cudagraphs"},
                                                    what="max-autotune-no-cudagraphs"),
            "sample-ar-pdl": functools.partial(sample_ar, decode_options={"options": {"triton.enable_pdl": True}},
                                               what="PDL"),
            "sample-ar-cublas": sample_ar_cublas, "sample-ar-no-pdl": sample_ar_no_pdl,
            "sample-ar-split": sample_ar_split,
            "sample-ar-unfused-query": functools.partial(sample_ar_new_query, fused=False),
            "sample-ar-fused-query": functools.partial(sample_ar_new_query, fused=True),
            "sample-var": sample_var, "maxbatch": maxbatch,
            **{f"profile-{k}": functools.partial(profile_sampling, name=n)
               for k, n in (("masked", "masked-B"), ("ar", "ar-B"), ("var", "var-d16"))}}
    for part in args.part:
        jobs[part](args, RowSink(args.rows_out, part, args.smoke))
        torch._dynamo.reset()   # compiled graphs hold the model: drop them before the next part
        free_memory()
        sync()


if __name__ == "__main__":
    main()
