"""The two numbers of every benchmark (METHOD.md): FLOPs and the fewest bytes through device memory.

Letters: B images, S sequences per forward (2B with CFG), L tokens per image (grid, or VAR's
pyramid), N = L for AR, K sampling passes, D width, V codebook, P weights read per pass
(non-embedding parameters; embedding rows are gathered, not read whole).

Each model returns ``flops`` (useful work, the MFU numerator), ``bytes`` (the floor: bf16 weights
read once per pass + bf16 KV cache traffic, nothing else), and ``impl_flops`` / ``impl_bytes``: what
the current code is predicted to move, which NOTES.md compares with the floor. The formulas are
written out in NOTES.md; ``python -m benchmarks.roofline`` prints the H100 table there.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from generator import masked
from generator.config import GeneratorConfig
from generator.masked import masked_counts
from generator.schedules import get_schedule
from generator.transformer import flops_per_token

BF16, FP32 = 2, 4
# bytes per element of the guided logits (B, L, V) that the eager masked sampler moves in one step:
# head out 2x2 (both halves) + cfg_combine 3 bf16 ops 16 + sample_logits (float, /T, softmax, Exp noise,
# divide, argmax) 42 + confidence (float, logsumexp) 10  (NOTES.md, "masked sampling")
MASKED_SAMPLER_BYTES_PER_LOGIT = 72
# AR / VAR per-step sampling on (B, l, V): float copy, cfg, top-k/top-p masks, softmax, noise, argmax
SAMPLER_BYTES_PER_LOGIT = 40


def attention_flops(config: GeneratorConfig, context: int) -> float:
    """QK^T and AV of one query over ``context`` keys, all layers (flops_per_token's attention term)."""
    return 4.0 * config.depth * context * config.dim


def dense_flops(config: GeneratorConfig, context: int) -> float:
    """flops_per_token without attention (blocks + head, adaLN amortised over ``context``)."""
    return flops_per_token(config, context, training=False) - attention_flops(config, context)


def kv_elems_per_slot(config: GeneratorConfig) -> int:
    """Elements of K and V for one cache slot of one sequence, all layers."""
    return 2 * config.depth * config.dim


def impl_bytes_per_elem(fp32_weights: bool) -> int:
    """Bytes the current code moves per weight per pass, and per KV-cache element read per step.
    fp32 weights under autocast, frozen as the pipelines freeze them (requires_grad False: autocast's
    cast cache only keeps casts of weights that require grad): read fp32, write bf16, read bf16 = 8.
    The KV cache takes the weights' dtype (setup_caches(..., head.weight.dtype)): fp32 -> converted
    whole to bf16 each step (4 + 2 + 2 = 8); bf16 weights / cache: 2."""
    return FP32 + 2 * BF16 if fp32_weights else BF16


def masked_sampling(config: GeneratorConfig, weights: int, batch: int, steps: int, cfg: bool,
                    fp32_weights: bool = True) -> dict:
    """K = steps forwards of the blocks over S_k sequences of 1 + L tokens (class token + grid), no KV
    cache; the head (2 D V per position) and the last block's projection and MLP (2 (D^2 + 3 D H)) run at
    the M_k grid positions still masked at step k (confidence sampler, ``masked_counts``), and the sampler
    step reads their B M_k V guided logits. S_k = 2B with guidance, but B + 1 at the first step when B > 1
    (one unconditional sequence for all: ``masked.unconditional_sequences``); B without."""
    L, Lp = config.num_tokens, config.num_tokens + 1
    seqs = [batch + masked.unconditional_sequences(batch, k, cfg) for k in range(steps)]
    at_masked = 2.0 * config.dim * config.codebook_size + 2.0 * (config.dim ** 2 + 3 * config.dim * config.mlp_hidden)
    counts = masked_counts(L, get_schedule(config.schedule), steps)
    per_row = flops_per_token(config, Lp, training=False) - at_masked
    flops = sum(S * (Lp * per_row + m * at_masked) for S, m in zip(seqs, counts))
    logits = batch * sum(counts) * config.codebook_size
    w = impl_bytes_per_elem(fp32_weights)
    return {"flops": flops, "bytes": steps * weights * BF16, "impl_flops": flops,
            "impl_bytes": steps * weights * w + logits * MASKED_SAMPLER_BYTES_PER_LOGIT, "passes": steps}


def ar_sampling(config: GeneratorConfig, weights: int, batch: int, cfg: bool, fp32_weights: bool = True) -> dict:
    """N single-token passes (prefill of the class token + N-1 decode steps) over S sequences.
    Floor: bf16 weights per pass; KV of the filled slots read each step, each new slot written once.
    Implemented: a static cache of N slots in the weights' dtype, all N slots read every step (the
    masked attention kernel skips nothing), see ``impl_bytes_per_elem``."""
    S, N, V = batch * (2 if cfg else 1), config.num_tokens, config.codebook_size
    useful = S * sum(dense_flops(config, N) + attention_flops(config, i) for i in range(1, N + 1))
    kv = kv_elems_per_slot(config) * S
    e = impl_bytes_per_elem(fp32_weights)
    write = FP32 if fp32_weights else BF16
    return {"flops": useful, "bytes": N * weights * BF16 + kv * BF16 * (N * (N + 1) / 2 + N),
            "impl_flops": S * N * flops_per_token(config, N, training=False),
            "impl_bytes": N * weights * e + kv * (N * N * e + N * write) + N * batch * V * SAMPLER_BYTES_PER_LOGIT,
            "passes": N}


def var_sampling(config: GeneratorConfig, weights: int, batch: int, cfg: bool, fp32_weights: bool = True) -> dict:
    """One pass per scale k: l_k = s_k^2 queries over the P_k cached keys of scales <= k."""
    S, V, L = batch * (2 if cfg else 1), config.codebook_size, config.num_tokens
    sizes = [s * s for s in config.scales]
    prefix = [sum(sizes[:k + 1]) for k in range(len(sizes))]
    dense = dense_flops(config, L)
    useful = S * sum(l * (dense + attention_flops(config, p)) for l, p in zip(sizes, prefix))
    kv = kv_elems_per_slot(config) * S
    e, write = impl_bytes_per_elem(fp32_weights), FP32 if fp32_weights else BF16
    return {"flops": useful, "bytes": len(sizes) * weights * BF16 + kv * BF16 * sum(p + l for l, p in zip(sizes, prefix)),
            "impl_flops": S * L * (dense + attention_flops(config, L)),
            "impl_bytes": len(sizes) * weights * e + kv * sum(L * e + l * write for l in sizes)
            + batch * L * V * SAMPLER_BYTES_PER_LOGIT,
            "passes": len(sizes)}


def sampling(config: GeneratorConfig, weights: int, batch: int, cfg: bool, steps: int = 16,
             fp32_weights: bool = True) -> dict:
    if config.kind == "masked":
        return masked_sampling(config, weights, batch, steps, cfg, fp32_weights)
    if config.kind == "ar":
        return ar_sampling(config, weights, batch, cfg, fp32_weights)
    return var_sampling(config, weights, batch, cfg, fp32_weights)


# activation bytes written and read per token per block in training (bf16 unless noted), a rough
# count of what backward needs from forward: norm inputs (fp32), q k v, attention out + lse,
# gate_up out, SwiGLU product, residuals: ~24 D
TRAIN_ACTIVATION_BYTES_PER_D = 24


def training_step(config: GeneratorConfig, params: int, batch: int) -> dict:
    """One optimizer step on B sequences of L tokens: 3x the forward FLOPs (flops_per_token(training)).
    Bytes (a rough floor; training is compute-bound: ~4.7x at masked-L batch 256): bf16 weight reads in
    forward and the two backward matmuls (6), fp32 cast source (4) and grad (4 + 4), fused AdamW p, m, v
    read + write (24) = 42 bytes/param; logits (B L V) bf16 out + fp32 loss + grad (12 bytes); activations written in
    forward and read in backward (2 x 24 D bytes per token per block)."""
    tokens = batch * config.num_tokens
    flops = tokens * flops_per_token(config, config.num_tokens, training=True)
    acts = 2 * tokens * config.depth * TRAIN_ACTIVATION_BYTES_PER_D * config.dim
    logits = tokens * config.codebook_size * 12
    return {"flops": flops, "bytes": params * 42 + logits + acts}


class _OutputBytes(TorchDispatchMode):
    """Sums the bytes of every op's tensor outputs: an eager (unfused) run writes each once and
    reads it at least once, so 2x this is the activation traffic of an unfused execution."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def count(fn, *inputs) -> dict:
    """FLOPs (torch.utils.flop_counter: matmuls, convs, attention) and op-output bytes of ``fn(*inputs)``.
    Works on meta tensors, so full-size models are counted on the CPU in a second."""
    with FlopCounterMode(display=False) as fc, _OutputBytes() as ob:
        fn(*inputs)
    return {"flops": float(fc.get_total_flops()), "output_bytes": float(ob.bytes)}


def vqgan_codec(model, batch: int = 1) -> dict:
    """Per-image FLOPs and bytes of decode (ids -> pixels) and encode (pixels -> latents) of a VQGAN,
    counted on a bf16 meta copy. Floor bytes: bf16 weights read once per batch + the image written
    (decode) or read (encode); ``eager_bytes`` adds 2x every intermediate (write + read)."""
    c = model.config
    with torch.device("meta"):
        meta = type(model)(c).to(torch.bfloat16)
    g, res = c.grid_size, c.resolution
    z = torch.empty(batch, c.codebook_dim, g, g, device="meta", dtype=torch.bfloat16)
    x = torch.empty(batch, 3, res, res, device="meta", dtype=torch.bfloat16)
    dec = count(lambda t: meta.decoder(meta.post_quant_conv(t)), z)
    enc = count(lambda t: meta.quant_conv(meta.encoder(t)), x)
    image = 3 * res * res * BF16 * batch
    w_dec = sum(p.numel() for p in model.decoder.parameters()) * BF16
    w_enc = sum(p.numel() for p in model.encoder.parameters()) * BF16
    return {"decode": {"flops": dec["flops"] / batch, "bytes_per_batch_weights": w_dec, "image_bytes": image / batch,
                       "eager_bytes": 2 * dec["output_bytes"] / batch},
            "encode": {"flops": enc["flops"] / batch, "bytes_per_batch_weights": w_enc, "image_bytes": image / batch,
                       "eager_bytes": 2 * enc["output_bytes"] / batch}}


def codec_floor(per_image: dict, batch: int) -> dict:
    """Floor of one batch through the decoder or encoder: FLOPs, and weights + images as bytes."""
    return {"flops": per_image["flops"] * batch,
            "bytes": per_image["bytes_per_batch_weights"] + per_image["image_bytes"] * batch,
            "impl_bytes": per_image["bytes_per_batch_weights"] + per_image["eager_bytes"] * batch}


def table(batch: int = 64) -> list[dict]:
    """The floors of every benchmark at the H100's numbers (NOTES.md), from models built on meta."""
    from benchmarks.common import H100, floors
    from benchmarks.gen_train import load_config
    from benchmarks.setups import build_generator, tokenizer_sections
    from generator.base import build_generator as build
    from tokenizer.vqgan import VQGAN

    rows = []

    def add(name, b, m, images=None, tokens=None, **kw):
        f = floors(m["flops"], m["bytes"], H100, m.get("impl_bytes"))
        rows.append({"name": name, "batch": b, "gflop": m["flops"] / 1e9, "floor_gb": m["bytes"] / 1e9,
                     "compute_ms": f["compute_floor_s"] * 1e3, "memory_ms": f["memory_floor_s"] * 1e3,
                     "bound": f["bound"], "impl_gb": m.get("impl_bytes", m["bytes"]) / 1e9,
                     "impl_memory_ms": f.get("impl_memory_s", f["memory_floor_s"]) * 1e3,
                     "ceiling_images_per_s": images / f["floor_s"] if images else None,
                     "ceiling_tokens_per_s": tokens / f["floor_s"] if tokens else None, **kw})

    with torch.device("meta"):
        codecs = {w: vqgan_codec(VQGAN(tokenizer_sections(w, False)["model"])) for w in ("f16", "msvq")}
        for name, steps, fp32 in (("masked-B", 16, True), ("masked-B", 8, True), ("ar-B", 0, True),
                                  ("ar-B", 0, False), ("var-d16", 0, True), ("var-d16", 0, False)):
            model = build_generator(name, False, torch.device("meta"))
            P = model.num_params(non_embedding=True)
            for b in (batch, 1):
                m = sampling(model.config, P, b, cfg=True, steps=steps, fp32_weights=fp32)
                label = f"{name}" + (f" @{steps}" if steps else "") + ("" if fp32 else " bf16-weights")
                add(label, b, m, images=b, params_M=model.num_params() / 1e6)
                codec = codecs["msvq" if name.startswith("var") else "f16"]["decode"]
                d = codec_floor(codec, b)
                add(label + " +decode", b, {k: m[k] + d[k] for k in ("flops", "bytes", "impl_bytes")}, images=b)
        for w, c in codecs.items():
            for part in ("decode", "encode"):
                add(f"{w} {part}", batch, codec_floor(c[part], batch), images=batch,
                    gflop_per_image=c[part]["flops"] / 1e9)
        for name in ("masked-L", "ar-L", "var-d16"):
            cfg = load_config(name, False)["model"]
            model = build(cfg)
            params = sum(p.numel() for p in model.parameters())
            for b in (256,):
                add(f"{name} train", b, training_step(cfg, params, b), tokens=b * cfg.num_tokens,
                    params_M=params / 1e6, flops_per_token=flops_per_token(cfg, cfg.num_tokens, True))
    return rows


if __name__ == "__main__":
    from benchmarks.common import print_table
    print_table(table(), ["name", "batch", "gflop", "floor_gb", "compute_ms", "memory_ms", "bound", "impl_gb",
                          "impl_memory_ms", "ceiling_images_per_s", "ceiling_tokens_per_s"])
