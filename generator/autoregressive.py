"""Raster-order autoregressive generation over VQ token grids (LlamaGen class-to-image, seed lecture 004).

p(x | c) = prod_i p(t_i | c, t_<i) with t in raster order. The input sequence is
``[class, t_0, ..., t_{N-2}]`` and output position i predicts t_i, so one causal pass scores all N
tokens (teacher forcing).

Positions (2D RoPE): the class token is the identity rotation (it has no place on the grid); the
input at position i >= 1 is token t_{i-1} and carries *its own* grid position (row, col) of t_{i-1}
(LlamaGen's ``[zeros(cls); grid]`` table, cut to N rows). Which cell comes next is implicit in raster
order; attention to the class token (angle 0, like cell (0, 0)) exposes the absolute position.

Sampling lives outside the network, gpt-fast style: ``prefill`` writes the class token into a
static KV cache of N slots, ``decode_one_token`` runs one cached forward, ``pick_token`` guides,
filters, draws (from Exp(1) noise drawn beforehand) and forces known tokens, ``decode_step`` is the
two together (the function that is compiled), ``run_tokens`` decodes a chunk of tokens from and into
static ``DecodeBuffers``, and ``decode_n_tokens`` is the loop over chunks: it draws each chunk's noise
from the ``torch.Generator`` and runs the chunk, on CUDA from a setup's second call as one CUDA-graph
replay of the compiled steps (``ARDecoder``).

Letters: B batch (2B with CFG), N = h*w tokens, V codebook size, D width, F rotary frequencies.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from generator.base import CompiledOrEager, Generator, LossOutput, eval_mode
from generator.call_graphs import storage_key
from generator.config import GeneratorConfig
from generator.sampling import cfg_combine_doubled, cfg_scale_at, draw_with_noise, fill_exponential_, keep_known
from generator.transformer import KVCache, rope_tables

logger = logging.getLogger(__name__)

KV_BUCKET = 32      # cached decoding reads cache slots in multiples of this many
GRAPH_TOKENS = 32   # tokens per chunk: one noise buffer and, on CUDA, one captured graph each


def kv_slots(pos: int, num_slots: int, bucket: int | None = None) -> int:
    """Cache slots the step at position ``pos`` attends over: slots 0..pos are filled, rounded up to a
    multiple of ``bucket`` (default ``KV_BUCKET``; the compiled step is dynamic in this length, so one
    compile serves all N / bucket of them) and capped at ``num_slots``. The slots above ``pos`` are
    masked out anyway, so this only saves reading empty ones (about 44% of the reads at 16x16 tokens)."""
    bucket = bucket or KV_BUCKET
    return min(num_slots, -(-(pos + 1) // bucket) * bucket)


def pick_token(logits_BV: torch.Tensor, pos_1: torch.Tensor, scales_N: torch.Tensor | None,
               noise_BV: torch.Tensor | None, known_BN: torch.Tensor | None, known_mask_BN: torch.Tensor | None,
               temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Token p = ``pos_1`` (LongTensor (1,)) from its logits -> ids (B,) long. A pure tensor function: no
    generator, no host sync, traceable by ``torch.compile(fullgraph=True)``.

    - guidance: with ``scales_N`` (N,) float32 (the scale of every token), the logits are the doubled
      [cond; uncond] (2B, V) and become uncond + s (cond - uncond), s = scales_N[p]; where s == 1 they
      are the conditional half exactly (no rounding through the combine).
    - draw: argmax(p / E) with p = softmax(top-k/top-p(logits / temperature)) and E = ``noise_BV``
      (B, V) float32 ~ Exp(1) (``exponential_noise``), as ``sample_logits`` draws; ``noise_BV`` None
      is greedy (argmax of the logits: temperature 0, and nothing drawn).
    - inpainting: where ``known_mask_BN[:, p]``, the id is ``known_BN[:, p]`` (``keep_known``).
    """
    if scales_N is not None:
        logits_2BV, scale_1 = logits_BV.float(), scales_N[pos_1]
        logits_BV = torch.where(scale_1 == 1.0, logits_2BV[:logits_2BV.shape[0] // 2],
                                cfg_combine_doubled(logits_2BV, scale_1))
    ids_B, _ = draw_with_noise(logits_BV, noise_BV, temperature, top_k, top_p)
    if known_mask_BN is None:
        return ids_B
    return keep_known(ids_B, known_BN.index_select(1, pos_1)[:, 0], known_mask_BN.index_select(1, pos_1)[:, 0])


class ARGenerator(Generator):
    kind = "ar"
    # torch.compile options of the decode step; a benchmark may add e.g. mode="max-autotune-no-cudagraphs"
    # (CUDA graphs come from the captured chunks, not from the compile mode)
    decode_compile_options = {"fullgraph": True}

    def __init__(self, config: GeneratorConfig):
        super().__init__(config)
        N = config.num_tokens
        self.tok_emb = nn.Embedding(config.codebook_size, config.dim)
        # input i >= 1 is t_{i-1} at its own grid cell; row 0 (class token) is the identity rotation
        cos_NF, sin_NF = rope_tables(self.grid_positions()[:N - 1], config.head_dim, config.rope_base, num_prefix=1)
        self.register_buffer("rope_cos", cos_NF, persistent=False)
        self.register_buffer("rope_sin", sin_NF, persistent=False)
        # rows of the causal mask, indexed by cache slot during cached decoding
        self.register_buffer("causal", torch.ones(N, N, dtype=torch.bool).tril(), persistent=False)
        self._init_weights()

    # ---- teacher-forced forward --------------------------------------------------------------
    def _forward(self, ids_BL: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V): position i predicts t_i from [class, t_0 .. t_{i-1}]."""
        N = self.config.num_tokens
        cls_BD = self.class_emb(classes_B)
        x_BND = torch.cat([cls_BD[:, None], self.tok_emb(ids_BL[:, :N - 1])], dim=1)
        cond_BD = cls_BD if self.config.adaln else None
        h_BND = self.backbone(x_BND, self.rope_cos, self.rope_sin, cond_BD, is_causal=True)   # flash on GPU
        return self.head(h_BND)

    def logits(self, ids_BL: torch.Tensor, classes_B) -> torch.Tensor:
        """Full teacher-forced forward: ids (B, N) or (B, h, w) long, classes (B,) -> logits (B, N, V)."""
        ids_BL = self.checked_token_batch(ids_BL)
        return self._forward(ids_BL, self.class_ids(classes_B, ids_BL.shape[0]))

    def loss(self, ids_BL: torch.Tensor, labels_B: torch.Tensor) -> LossOutput:
        """Mean next-token cross-entropy over all N tokens, with class dropout (for CFG).

        No host sync here (ids are trusted to be in range: the token cache records codebook_size).
        """
        ids_BL = self.token_batch(ids_BL)
        self.check_label_count(labels_B, ids_BL.shape[0])
        logits_BNV = self._forward(ids_BL, self.drop_classes(labels_B.long()))
        loss = F.cross_entropy(logits_BNV.float().flatten(0, 1), ids_BL.flatten())
        accuracy = (logits_BNV.detach().argmax(-1) == ids_BL).float().mean()
        return LossOutput(loss, {"loss": loss.detach(), "accuracy": accuracy})

    @torch.no_grad()
    @eval_mode
    def nll_bits_per_token(self, ids_BL: torch.Tensor, labels_B, generator: torch.Generator | None = None
                           ) -> torch.Tensor:
        """Exact -log2 p(x | class) / N per image, (B,) float. Class given (no dropout), dropout off;
        ``generator`` is unused (the AR likelihood is exact)."""
        ids_BL = self.checked_token_batch(ids_BL)
        logits_BNV = self._forward(ids_BL, self.class_ids(labels_B, ids_BL.shape[0])).float()
        nll_BN = F.cross_entropy(logits_BNV.transpose(1, 2), ids_BL, reduction="none")
        return nll_BN.mean(dim=1) / math.log(2)

    # ---- cached decoding (gpt-fast: prefill -> decode_one_token -> decode_n_tokens) -----------
    def _cond(self, cls_BD):
        return cls_BD if self.config.adaln else None

    def prefill(self, classes_B: torch.Tensor) -> torch.Tensor:
        """Write the class token into cache slot 0; logits (B, V) for t_0. Caches must be set up."""
        cls_BD = self.class_emb(classes_B)
        h = self.backbone(cls_BD[:, None], self.rope_cos[:1], self.rope_sin[:1], self._cond(cls_BD),
                          mask_LS=self.causal[:1], cache_pos=0)
        return self.head(h[:, 0])

    def decode_one_token(self, prev_ids_B: torch.Tensor, pos_1: torch.Tensor, classes_B: torch.Tensor,
                         causal_NS: torch.Tensor | None = None) -> torch.Tensor:
        """One cached step: feed t_{p-1} (B,) at input position / cache slot p = ``pos_1`` (LongTensor
        (1,), 1 <= p < N, unchecked so the step can be graph-captured) -> logits (B, V) for t_p.
        ``causal_NS``: the causal mask's first S > p columns (``kv_slots``), so attention reads only
        cache slots 0..S-1; default all N."""
        causal_NS = self.causal if causal_NS is None else causal_NS
        cls_BD = self.class_emb(classes_B)
        h = self.backbone(self.tok_emb(prev_ids_B)[:, None], self.rope_cos[pos_1], self.rope_sin[pos_1],
                          self._cond(cls_BD), mask_LS=causal_NS[pos_1], cache_pos=pos_1)
        return self.head(h[:, 0])

    def decode_step(self, prev_B: torch.Tensor, pos_1: torch.Tensor, classes_B: torch.Tensor, causal_NS: torch.Tensor,
                    scales_N: torch.Tensor | None, noise_BV: torch.Tensor | None, known_BN: torch.Tensor | None,
                    known_mask_BN: torch.Tensor | None, temperature: float, top_k: int, top_p: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole decode step, the function that is compiled: ``decode_one_token`` (feed t_{p-1} at
        p = ``pos_1``, attending to the slots ``causal_NS`` covers) then ``pick_token`` (guide, filter,
        draw with the given noise, force known) -> (ids (B,) of t_p, the next step's input: ids doubled
        [ids; ids] with guidance, else ids). ``scales_N`` is None without guidance, ``noise_BV`` None at
        temperature 0."""
        logits_BV = self.decode_one_token(prev_B, pos_1, classes_B, causal_NS)
        ids_B = pick_token(logits_BV, pos_1, scales_N, noise_BV, known_BN, known_mask_BN, temperature, top_k, top_p)
        return ids_B, (torch.cat([ids_B, ids_B]) if scales_N is not None else ids_B)

    def _decoder(self, compile: bool) -> "ARDecoder":
        """The decode step and its buffers: with ``compile`` the torch.compile'd step (fullgraph, dynamic in
        the cache length) with the buffers of the last setup and, on CUDA, their graphs, built once per
        module (``compiled_once``); a compile failure (at build, first call or later) falls back to eager
        for good with a warning (``CompiledOrEager``). Without, the eager step and fresh buffers."""
        if not compile:
            return ARDecoder(self.decode_step)
        return self.compiled_once(lambda: ARDecoder(CompiledOrEager(
            self.decode_step, self.decode_step, "AR decode step", logger, "decoding eagerly",
            **self.decode_compile_options)))

    def run_tokens(self, step, buf: "DecodeBuffers", start: int, stop: int, temperature: float, top_k: int,
                   top_p: float) -> None:
        """Decode tokens start .. stop-1 from and into ``buf`` (what a CUDA graph of one chunk captures).
        Token 0 comes from the prefill (which writes the class token into cache slot 0), token i >= 1 from
        ``step`` fed t_{i-1}; token i draws with ``buf.noise[i - start]``; each id goes into ``buf.ids_BN``
        and (doubled with guidance) into ``buf.prev_B``, the next step's input."""
        N, guided = self.config.num_tokens, buf.scales_N is not None
        for i in range(start, stop):
            noise_BV = None if buf.noise is None else buf.noise[i - start]
            if i == 0:
                logits_BV = self.prefill(buf.classes_B)     # cached steps attend without SDPA: attend_one_query
                ids_B = pick_token(logits_BV, buf.pos[0], buf.scales_N, noise_BV, buf.known_BN, buf.mask_BN,
                                   temperature, top_k, top_p)
                next_B = torch.cat([ids_B, ids_B]) if guided else ids_B
            else:
                ids_B, next_B = step(buf.prev_B, buf.pos[i], buf.classes_B, buf.causal[kv_slots(i, N)],
                                     buf.scales_N, noise_BV, buf.known_BN, buf.mask_BN, temperature, top_k, top_p)
            buf.ids_BN[:, i] = ids_B
            buf.prev_B.copy_(next_B)

    def decode_n_tokens(self, classes_B: torch.Tensor, scales: list[float], guided: bool, temperature: float,
                        top_k: int, top_p: float, generator: torch.Generator | None, known_BN: torch.Tensor | None,
                        known_mask_BN: torch.Tensor | None, compile: bool) -> torch.Tensor:
        """Draw t_0 .. t_{N-1} one token per step -> ids (B, N) long.

        ``classes_B`` is doubled [cond; null] when ``guided``; ``scales[i]`` is the guidance scale of
        token i (1 = the conditional half as it is), a table the step indexes by position. The tokens go
        in chunks of ``GRAPH_TOKENS``: per chunk the loop first draws E ~ Exp(1) (B, V) for each of its
        tokens from ``generator`` into the buffers (the draws ``sample_logits`` makes, in the same order:
        the generator is used for nothing else; none at temperature 0), then decodes the chunk
        (``run_tokens``): eagerly, through the compiled step, or on CUDA from the second call of the same
        setup by replaying the chunk's CUDA graph, so the host launches one graph per 32 tokens instead
        of a compiled call per token (NOTES A28). No host syncs in the loop.
        """
        N = self.config.num_tokens
        if (known_BN is None) != (known_mask_BN is None):
            raise ValueError("inpainting needs both known_BN and known_mask_BN")
        decoder = self._decoder(compile)
        buf = decoder.buffers_for(self, classes_B, guided, temperature, top_k, top_p, known_BN is not None)
        buf.load(self, classes_B, scales, known_BN, known_mask_BN)
        graphs = decoder.graphs(self, buf, temperature, top_k, top_p)
        for j, start in enumerate(range(0, N, GRAPH_TOKENS)):
            stop = min(start + GRAPH_TOKENS, N)
            if buf.noise is not None:
                for k in range(stop - start):
                    fill_exponential_(buf.noise[k], generator)
            if graphs is not None:
                graphs[j].replay()
            else:
                self.run_tokens(decoder.step, buf, start, stop, temperature, top_k, top_p)
        return buf.ids_BN.clone()

    @torch.no_grad()
    @eval_mode
    def sample(self, classes, *, num_steps: int | None = None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
               cfg_tokens: int | None = None, generator: torch.Generator | None = None,
               known_ids: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               compile: bool | None = None, batch_size: int | None = None, **ignored) -> torch.Tensor:
        """Class ids (B,) or None (unconditional, needs ``batch_size`` or ``known_ids``) -> ids (B, h, w) long.

        One token per step in raster order (``num_steps`` is ignored). CFG doubles the batch with the
        null class: ``logits = uncond + s_i (cond - uncond)`` with ``s_i`` from ``cfg_schedule``
        ("constant", or "linear" from 1 at token 0 to ``cfg_scale`` at token N-1); with ``cfg_tokens = T``
        tokens i >= T use s = 1 (the batch stays doubled so the graph-captured step keeps its shape,
        and the conditional logits are used as they are). Every draw uses ``generator``.

        Inpainting: ``known_ids`` / ``known_mask`` (B, h, w); wherever the mask is True the known id
        is forced in place of the draw before it is fed back, so later tokens condition on it. AR sees
        only the context *before* a token in raster order: known tokens after a hole do not inform
        the hole (use the masked generator when that matters).

        ``compile`` (default: True on CUDA) runs the whole decode step (``decode_step``: forward, guidance,
        top-k / top-p, softmax, the draw and the inpainting rule) through torch.compile (fullgraph,
        ``decode_compile_options``) and falls back to eager with a warning if that fails. The Exp(1)
        noise of each draw is taken from ``generator`` outside the step, in the same order either way.
        Same seed, same ids holds on CPU and with ``compile=False`` on CUDA; the compiled step's fused kernels may round
        differently from eager ones, and with the CUDA-graph step last-bit run-to-run differences (H100,
        torch 2.11) changed a few late draws. Runs in the caller's autocast context. On CUDA the second
        call of the same setup (batch, guidance, filters, inpainting, autocast) captures the decoding in
        CUDA graphs, one per 32 tokens, which later calls replay; the compiled decoder keeps that setup's
        buffers and KV caches (AR-B at batch 64 with CFG: ~1.3 GB) until a new setup replaces them. The
        module itself is left without KV caches.
        """
        if ignored:
            logger.debug("ARGenerator.sample ignores %s", sorted(ignored))
        self.check_sampling_args(1, temperature, top_k, top_p, cfg_scale)
        c, device = self.config, self.head.weight.device
        N, g = c.num_tokens, c.grid_size
        if cfg_tokens is not None and not 0 <= cfg_tokens <= N:
            raise ValueError(f"cfg_tokens must be in [0, {N}], got {cfg_tokens}")
        if batch_size is None and known_ids is not None:
            batch_size = known_ids.shape[0]
        classes_B = self.class_ids(classes, batch_size, device)
        B = classes_B.shape[0]
        known_BN = mask_BN = None
        if known_mask is not None or known_ids is not None:
            if known_mask is None or known_ids is None:
                raise ValueError("inpainting needs both known_ids and known_mask")
            if tuple(known_ids.shape) != (B, g, g) or tuple(known_mask.shape) != (B, g, g):
                raise ValueError(f"known_ids and known_mask must be ({B}, {g}, {g}), got "
                                 f"{tuple(known_ids.shape)} and {tuple(known_mask.shape)}")
            if known_mask.dtype != torch.bool:
                raise ValueError(f"known_mask must be bool, got {known_mask.dtype}")
            if known_ids.is_floating_point() or known_ids.dtype == torch.bool:
                raise ValueError(f"known_ids must be integers, got dtype {known_ids.dtype}")
            mask_BN = known_mask.to(device).reshape(B, N)
            known_BN = torch.where(mask_BN, known_ids.to(device).reshape(B, N).long(), 0)
            self.check_ids(known_BN)
        scales = [cfg_scale_at(cfg_scale, i / max(N - 1, 1), cfg_schedule) for i in range(N)]
        if cfg_tokens is not None:
            scales = [s if i < cfg_tokens else 1.0 for i, s in enumerate(scales)]
        guided = any(s != 1.0 for s in scales)
        if guided:
            classes_B = torch.cat([classes_B, torch.full_like(classes_B, c.null_class)])
        if compile is None:
            compile = device.type == "cuda"

        try:
            ids_BN = self.decode_n_tokens(classes_B, scales, guided, temperature, top_k, top_p, generator, known_BN,
                                          mask_BN, compile)
        finally:
            self.backbone.remove_caches()     # the decode buffers own the caches (kept with their graphs)
        return ids_BN.reshape(B, g, g)


class DecodeBuffers:
    """The tensors one sampling setup decodes from and into, allocated once so that CUDA graphs read and
    write them in place: the inputs (copied in by ``load``), the Exp(1) noise of one chunk of tokens, one
    (1,) position tensor per token and the causal mask's column prefixes the steps index (separate tensors:
    no storage offsets for the compiled step to specialise on), the step's input, the output ids, and the
    KV caches (owned here, installed in the blocks by ``load``, so they outlive ``remove_caches``)."""

    def __init__(self, model: ARGenerator, batch2: int, guided: bool, draws: bool, inpainting: bool):
        c, device = model.config, model.head.weight.device
        N, B = c.num_tokens, batch2 // 2 if guided else batch2
        self.classes_B = torch.empty(batch2, dtype=torch.long, device=device)
        self.scales_N = torch.empty(N, dtype=torch.float32, device=device) if guided else None
        self.known_BN = torch.empty(B, N, dtype=torch.long, device=device) if inpainting else None
        self.mask_BN = torch.empty(B, N, dtype=torch.bool, device=device) if inpainting else None
        self.noise = ([torch.empty(B, c.codebook_size, device=device) for _ in range(GRAPH_TOKENS)]
                      if draws else None)
        self.pos = [torch.full((1,), i, dtype=torch.long, device=device) for i in range(N)]
        self.causal = {}
        for S in sorted({kv_slots(i, N) for i in range(1, N)}):
            self.causal[S] = model.causal[:, :S].contiguous()
            torch._dynamo.maybe_mark_dynamic(self.causal[S], 1)   # one compile for every length
        self.prev_B = torch.empty(batch2, dtype=torch.long, device=device)
        self.ids_BN = torch.empty(B, N, dtype=torch.long, device=device)
        # one slot more than needed: a step's view of the first S slots is then never the whole cache, whose
        # other strides would make the compiled step recompile for S = N
        model.backbone.setup_caches(batch2, N + 1, model.compute_dtype(), device)
        self.caches = [block.attn.kv_cache for block in model.backbone.blocks]
        self.calls = 0

    def load(self, model: ARGenerator, classes_B: torch.Tensor, scales: list[float],
             known_BN: torch.Tensor | None, mask_BN: torch.Tensor | None) -> None:
        self.classes_B.copy_(classes_B)
        if self.scales_N is not None:
            self.scales_N.copy_(torch.tensor(scales, dtype=torch.float32))
        if self.known_BN is not None:
            self.known_BN.copy_(known_BN)
            self.mask_BN.copy_(mask_BN)
        for block, cache in zip(model.backbone.blocks, self.caches):
            block.attn.kv_cache = cache


class ARDecoder:
    """The decode step (``ARGenerator.decode_step`` or its compiled version) and, for the compiled one,
    the buffers of the last sampling setup and their CUDA graphs (one per chunk of ``GRAPH_TOKENS``
    tokens, captured at the setup's second call). A new setup (batch, guidance, filters, inpainting,
    autocast, or weights in new storage) replaces them; an eager decoder makes fresh buffers per call."""

    def __init__(self, step):
        self.step = step
        self.key = self.buffers = self._graphs = None

    def __deepcopy__(self, memo) -> "ARDecoder":
        # a copy (e.g. an EMA) rebuilds its own decoder (``compiled_once``); buffers and graphs stay here
        return ARDecoder(self.step)

    @property
    def keeps(self) -> bool:
        return isinstance(self.step, CompiledOrEager)

    def buffers_for(self, model: ARGenerator, classes_B: torch.Tensor, guided: bool, temperature: float,
                    top_k: int, top_p: float, inpainting: bool) -> DecodeBuffers:
        # the graphs read the weights and tables in place: new storage (e.g. after ``model.half()``) is a new setup
        storage = storage_key(model, skip=KVCache)
        key = (classes_B.shape[0], guided, temperature, top_k, top_p, inpainting, model.compute_dtype(),
               torch.is_autocast_enabled(classes_B.device.type), storage)
        if not self.keeps or key != self.key:
            self.key, self.buffers, self._graphs = key, None, None      # free the old setup first
            self.buffers = DecodeBuffers(model, classes_B.shape[0], guided, temperature > 0, inpainting)
        self.buffers.calls += 1
        return self.buffers

    def graphs(self, model: ARGenerator, buf: DecodeBuffers, temperature: float, top_k: int, top_p: float
               ) -> list[torch.cuda.CUDAGraph] | None:
        """The chunks' CUDA graphs for ``buf`` (compiled step on CUDA, from its second call), else None. A
        capture that fails warns once and the setup decodes through the compiled step uncaptured."""
        if not (self.keeps and self.step.compiled and buf.calls >= 2 and buf.classes_B.is_cuda):
            return None
        if self._graphs is None:
            N, pool, graphs = model.config.num_tokens, torch.cuda.graph_pool_handle(), []
            try:
                for start in range(0, N, GRAPH_TOKENS):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        model.run_tokens(self.step, buf, start, min(start + GRAPH_TOKENS, N), temperature, top_k,
                                         top_p)
                    graphs.append(graph)
                self._graphs = graphs
            except Exception as e:       # noqa: BLE001 - e.g. an op that cannot be captured
                logger.warning("capturing the AR decode loop in CUDA graphs failed (%s: %s); decoding through "
                               "the compiled step", type(e).__name__, e)
                self._graphs = False
        return self._graphs or None


# ---- named sizes (LlamaGen c2i: 16x16 tokens of a 16384-code tokenizer, 1000 classes) -------------
def _ar(dim: int, depth: int, heads: int, kw: dict) -> ARGenerator:
    """A named size; ``kw`` overrides any config field (dim/depth/heads included)."""
    base = dict(kind="ar", codebook_size=16384, grid_size=16, num_classes=1000, dim=dim, depth=depth, heads=heads)
    return ARGenerator(GeneratorConfig(**{**base, **kw}))


def ar_B(**kw) -> ARGenerator:    # 110.9M params (LlamaGen GPT-B: 111M)
    return _ar(768, 12, 12, kw)


def ar_L(**kw) -> ARGenerator:    # 338.2M params (LlamaGen GPT-L: 343M; our SwiGLU hidden rounds to 64, theirs to 256)
    return _ar(1024, 24, 16, kw)
