"""GPU benchmarks of the VQ-GAN tokenizer, and a time-bounded emoji training run.

    python3 -m benchmarks.tokenizer [--part decode|encode|train ...] [--smoke] [--rows-out F]
    python3 -m benchmarks.tokenizer --emoji-train SECONDS [--smoke]

imagenet-f16 (configs/tokenizer/imagenet-f16.yaml: 256 px -> 16x16 ids, 16384 codes; LlamaGen VQ-16's
layout), random weights, bf16 autocast, batch 64: encode and decode images/s, eager / channels_last /
channels_last + torch.compile; one training step (TokenizerTask.train_step: VQGAN + LPIPS (random VGG trunk:
same FLOPs; offline machines have no VGG16 weights) + PatchGAN with the adaptive weight), GAN on and off.

--emoji-train trains configs/tokenizer/emoji-f8.yaml (else configs/demo/tokenizer.yaml) through the
real `tessera train-tokenizer` CLI under `timeout -s TERM SECONDS` (the trainer checkpoints and
writes the model dir on SIGTERM), then reports val PSNR and codebook usage on the val split.
TESSERA_EMOJI_SET="key=value ..." adds config overrides (an ablation, e.g. loss.disc_start=4000); the row
records them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import roofline
from benchmarks.common import (H100, RowSink, autocast, compiled, cudnn_benchmark, default_emoji_cache,
                               first_call_or_eager, floors, free_memory, is_oom, job_args, make_lpips_importable,
                               peak_flops, peak_memory_gb, repo_root, reset_peak_memory, sync, time_fn, timing)
from benchmarks.setups import F16_CONFIG, build_tokenizer, device, tokenizer_sections
from pipelines.config import parse_yaml

PARTS = ["decode", "encode", "train"]
EMOJI_CONFIGS = ("configs/tokenizer/emoji-f8.yaml", "configs/demo/tokenizer.yaml")
# smoke: the emoji config shrunk to seconds on the CPU (same CLI, trainer, data and evaluation path)
EMOJI_SMOKE = ["model.base_channels=8", "model.z_channels=16", "model.num_res_blocks=1", "model.codebook_size=64",
               "train.batch_size=8", "train.num_workers=0", "train.log_every=1", "train.sample_every=0",
               "loss.disc_channels=8", "train.compile=false"]   # compile: tests/tokenizer (aot_eager), the GPU run


def codec_variants(args, sink: RowSink, which: str) -> None:
    """decode (ids -> images) or encode (images -> ids) at batch 64: eager, channels_last, and
    channels_last + torch.compile of the conv stack (the decoder / encoder module)."""
    dev = device(args.smoke)
    tok = build_tokenizer("f16", args.smoke, dev)
    B = 2 if args.smoke else args.batch
    counts = roofline.vqgan_codec(tok)[which]
    g, res = tok.grid_size, tok.config.resolution
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.codebook_size, (B, g, g), generator=gen).to(dev)
    images = (torch.rand(B, 3, res, res, generator=gen) * 2 - 1).to(dev)
    stack = tok.decoder if which == "decode" else tok.encoder
    fn = (lambda: tok.decode(ids)) if which == "decode" else (lambda: tok.encode(images))
    pf = peak_flops()
    f = roofline.codec_floor(counts, B)
    variants = [("contiguous", "eager"), ("channels_last", "eager")]
    if args.compile_mode != "none":      # compile on top of the better layout (convs: NHWC on tensor cores)
        variants.append(("channels_last", args.compile_mode))
    for memory_format, mode in variants:
        fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        tok.to(memory_format=fmt)
        if which == "encode":
            images = images.contiguous(memory_format=fmt)
        status = {"compile": "eager" if mode == "eager" else f"{which}r: {mode}"}
        run = lambda: _autocast_call(fn, dev)  # noqa: E731
        if mode != "eager":
            stack.forward = compiled(stack.forward, mode, args.smoke)
            if first_call_or_eager(run, None, status) is None:
                vars(stack).pop("forward", None)
        label = f"{which} {memory_format}" + ("" if mode == "eager" else " compiled")
        try:
            reset_peak_memory()
            t = time_fn(run, **timing(args.smoke))
            sink.add(name=f"f16 {label}", bench=which, model="imagenet-f16", config=F16_CONFIG, batch=B,
                     memory_format=memory_format,
                     dtype="bf16 autocast" if dev.type == "cuda" else "fp32 (cpu smoke)", **status, **t,
                     images_per_s=B / t["median_s"], mfu=f["flops"] / t["median_s"] / pf if pf else None,
                     peak_mem_gb=peak_memory_gb(), gflops_per_image=counts["flops"] / 1e9,
                     **floors(f["flops"], f["bytes"], H100 if args.smoke else None, f["impl_bytes"]))
        except Exception as e:  # noqa: BLE001
            sink.error(f"f16 {label}", e, batch=B, **status)
        vars(stack).pop("forward", None)
        free_memory()


def _autocast_call(fn, dev):
    with autocast(dev), torch.no_grad():
        return fn()


def train_step(args, sink: RowSink) -> None:
    """One training step of the real TokenizerTask (both optimizers), GAN on (the steady state after
    loss.disc_start) and off; batch 64, halved until it fits (the config's per-GPU batch is 32)."""
    from pipelines.train_tokenizer import TokenizerTask
    from pipelines.train_utils import match_state_layouts
    from tokenizer import VQGAN, VQGANLoss
    from torch.utils.flop_counter import FlopCounterMode
    dev = device(args.smoke)
    lpips_note = "LPIPS random VGG trunk (same FLOPs)"
    make_lpips_importable()
    if importlib.util.find_spec("lpips") is None:
        lpips_note = "LPIPS off: lpips not importable (carry .whl)"
    extra = ["loss.lpips_random_backbone=true"] if "off" not in lpips_note else ["loss.perceptual_weight=0"]
    cfg = tokenizer_sections("f16", args.smoke, extra)
    torch.manual_seed(0)
    model, loss = VQGAN(cfg["model"]).to(dev).train(), VQGANLoss(cfg["loss"]).to(dev).train()
    task = TokenizerTask(model, loss)
    opts = task.optimizers(cfg["train"])
    params = {name: [p for g in o.param_groups for p in g["params"]] for name, o in opts.items()}
    res = cfg["model"].resolution

    def step(images, gan_step):
        with autocast(dev):
            losses = task.train_step((images, None), gan_step)
        sum(l.float() for l in losses.values() if l.requires_grad).backward()
        for name, o in opts.items():
            torch.nn.utils.clip_grad_norm_(params[name], cfg["train"].grad_clip, foreach=True)
            o.step()
            o.zero_grad(set_to_none=True)

    disc_start = cfg["loss"].disc_start
    B = 2 if args.smoke else args.batch
    while True:
        images = (torch.rand(B, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
        try:
            step(images, disc_start)
            break
        except Exception as e:  # noqa: BLE001
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            free_memory()
            if not is_oom(e) or B <= 8:
                sink.error("f16 train step", e, batch=B)
                return
            B //= 2
    pf = peak_flops()
    n_params = sum(p.numel() for ps in params.values() for p in ps)
    step_flops = {}                                  # per GAN step: counted once, eagerly (fwd + bwd + extra grads)

    def timed_row(name, gan_step, compile_label, pick=False):
        try:
            with cudnn_benchmark(pick):
                if gan_step not in step_flops:
                    with FlopCounterMode(display=False) as fc:
                        step(images, gan_step)
                    step_flops[gan_step] = float(fc.get_total_flops())
                else:
                    step(images, gan_step)           # warm (the compiled rows: compiles here)
                flops = step_flops[gan_step]
                reset_peak_memory()
                t = time_fn(lambda: step(images, gan_step), **timing(args.smoke))
            sink.add(name=name, bench="train", model="imagenet-f16", config=F16_CONFIG,
                     batch=B, compile=compile_label,
                     dtype="bf16 autocast" if dev.type == "cuda" else "fp32 (cpu smoke)", **t,
                     images_per_s=B / t["median_s"], mfu=flops / t["median_s"] / pf if pf else None,
                     peak_mem_gb=peak_memory_gb(), note=lpips_note,
                     **floors(flops, n_params * 42 + images.numel() * 2 * 4, H100 if args.smoke else None))
        except Exception as e:  # noqa: BLE001
            sink.error(name, e, batch=B)

    # also with cuDNN timing its conv algorithms per shape (cudnn.benchmark; the Trainer leaves PyTorch's default,
    # off): the rows named "[cudnn.benchmark]" pair with the others of the same run
    for label, gan_step, pick in (("GAN on", disc_start, False), ("GAN off", 0, False), ("GAN on", disc_start, True)):
        timed_row(f"f16 train step ({label})" + (" [cudnn.benchmark]" if pick else ""), gan_step, "eager", pick)
    # then what train.compile does (TokenizerTask.compile_modules: NHWC, the VQGAN's conv stacks and LPIPS compiled,
    # in place), on the same batch: rows named "[compiled]" pair with the eager ones above (NOTES A68)
    if args.compile_mode == "none":
        return
    task.compile_modules(backend="eager" if args.smoke else "inductor")   # smoke: dynamo traces, no codegen
    for o in opts.values():         # Adam's moments from the eager steps into the params' new layout, as a resume does
        match_state_layouts(o)
    compile_label = "conv stacks + LPIPS compiled, channels_last"
    for label, gan_step in (("GAN on", disc_start), ("GAN off", 0)):
        timed_row(f"f16 train step ({label}) [compiled]", gan_step, compile_label)


# ---- emoji training run -------------------------------------------------------------------------
def emoji_train(seconds: float, smoke: bool, sink: RowSink) -> None:
    root = repo_root()
    config = next((c for c in EMOJI_CONFIGS if (root / c).is_file()), None)
    out = Path("/tmp/tessera-bench-emoji-tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    default_emoji_cache()
    make_lpips_importable()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    cmd = ["timeout", "-s", "TERM", "-k", "60", str(int(seconds)), sys.executable, "-m", "pipelines.cli",
           "train-tokenizer", "--config", config, "--output", str(out)]
    overrides = os.environ.get("TESSERA_EMOJI_SET", "").split()      # e.g. "loss.disc_start=4000 train.max_steps=8000"
    # every checkpoint kept (this run's dir is scratch): the val PSNR curve below reads them
    cmd += [a for o in ["train.keep_checkpoints=100"] + overrides for a in ("--set", o)]
    if smoke:
        cmd += [a for s in EMOJI_SMOKE for a in ("--set", s)] + ["--max-steps", "2"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tail = (p.stdout + p.stderr)[-3000:]
    print(tail)
    m = re.findall(r"at step (\d+)", p.stdout)
    last = _last_metrics(out / "metrics.jsonl")
    row = dict(bench="emoji-train", model=Path(config).stem, config=config, overrides=overrides, seconds=seconds,
               wall_s=wall, compile=_run_compile(out / "run.yaml"),
               returncode=p.returncode, steps=int(m[-1]) if m else last.get("step"),
               train_images_per_s=last.get("images_per_s"), train_psnr=last.get("psnr"))
    if not (out / "model.safetensors").is_file():
        last_line = tail.strip().splitlines()[-1][:200] if tail.strip() else "no output"
        sink.add(name=f"{Path(config).stem} emoji train", error=f"no model written (rc {p.returncode}): {last_line}",
                 **row)
        return
    try:
        tok, val = load_for_eval(out, root / config, smoke)
        row.update(evaluate(tok, val, smoke))
        row["val_psnr_by_step"] = val_psnr_curve(tok, val, out, smoke)
        ips = row["train_images_per_s"]
        row["note"] = (f"{row['steps']} steps" + (f" at {ips:.0f} img/s" if ips else "") + f" in {seconds:.0f} s; "
                       + row["note"])
        sink.add(name=f"{Path(config).stem} emoji train", **row)
    except Exception as e:  # noqa: BLE001
        sink.error(f"{Path(config).stem} emoji eval", e, **row)


def _run_compile(run_yaml: Path) -> str:
    """How the run trained, from the config it wrote (overrides applied): train.compile."""
    if not run_yaml.is_file():
        return "-"
    train = (parse_yaml(run_yaml.read_text()) or {}).get("train", {})
    return "conv stacks compiled, channels_last" if train.get("compile") else "eager"


def _last_metrics(path: Path) -> dict:
    """The last metrics.jsonl record that has a step (the trainer's window averages)."""
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "images_per_s" in r] or recs
    return recs[-1] if recs else {}


def load_for_eval(model_dir: Path, config: Path, smoke: bool):
    """The run's saved tokenizer and the val split of its data config (loaded once for every evaluation)."""
    from pipelines.config import load_sections
    from pipelines.data import build_image_dataset
    from pipelines.train_tokenizer import SECTIONS
    from tokenizer import VQGAN
    tok = VQGAN.from_pretrained(model_dir, device(smoke))
    data_cfg = load_sections(config, SECTIONS, [f"data.resolution={tok.config.resolution}"])["data"]
    return tok, build_image_dataset(data_cfg, "val")


def val_psnr_curve(tok, val, run_dir: Path, smoke: bool) -> dict[int, float]:
    """Val PSNR of every checkpoint the run kept ({step: dB}), each loaded into ``tok`` (which ends
    with the last one's weights): where the GAN (``loss.disc_start``) helps or hurts the held-out
    reconstructions."""
    from pipelines.checkpoint import list_checkpoints, load_checkpoint
    curve = {}
    for step, path in sorted(list_checkpoints(run_dir)):
        tok.load_state_dict(load_checkpoint(path).tensors["model"])
        curve[step] = evaluate(tok, val, smoke)["val_psnr_db"]
    return curve


@torch.no_grad()
def evaluate(tok, val, smoke: bool) -> dict:
    """Val split: PSNR of encode -> decode (the public API) and codebook statistics of the forward
    (perplexity), plus usage = distinct codes used / codebook size."""
    from pipelines.train_tokenizer import psnr, reconstruct
    dev = next(tok.parameters()).device
    n = min(len(val), 64 if smoke else len(val))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, range(n)), batch_size=256)
    psnr_sum, counts, perp = 0.0, torch.zeros(tok.codebook_size, dtype=torch.long), []
    for images, _ in loader:
        images = images.to(dev)
        with autocast(dev):
            recon = reconstruct(tok, images)
            out = tok(images)
        psnr_sum += float(psnr(images, recon.float())) * len(images)
        ids = torch.cat([i.flatten() for i in out.ids]) if isinstance(out.ids, list) else out.ids.flatten()
        counts += torch.bincount(ids.cpu(), minlength=tok.codebook_size)
        perp.append(float(out.stats["perplexity"]))
    p = counts.double() / counts.sum()
    usage, perplexity = float((counts > 0).double().mean()), float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"val_items": n, "val_psnr_db": psnr_sum / n, "val_codebook_usage": usage, "val_perplexity": perplexity,
            "val_forward_perplexity_mean": sum(perp) / len(perp), "codebook_size": tok.codebook_size,
            "note": f"val PSNR {psnr_sum / n:.2f} dB, codebook usage {usage:.1%} (distinct codes on {n} val images), "
                    f"perplexity {perplexity:.0f} of {tok.codebook_size}"}


def main() -> None:
    def extra(p):
        p.add_argument("--emoji-train", type=float, metavar="SECONDS", help="train the emoji tokenizer this long")
    args = job_args(__doc__.splitlines()[0], PARTS, extra, "default")   # convs: autotuning each shape costs minutes
    if args.emoji_train is not None:
        emoji_train(args.emoji_train, args.smoke, RowSink(args.rows_out, "tok-emoji", args.smoke))
        return
    for part in args.part:
        sink = RowSink(args.rows_out, f"tok-{part}", args.smoke)
        if part == "train":
            train_step(args, sink)
        else:
            codec_variants(args, sink, part)
        free_memory()
        sync()


if __name__ == "__main__":
    main()
