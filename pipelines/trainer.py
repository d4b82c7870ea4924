"""A model-agnostic training loop on HF accelerate: checkpoints, exact resume, logging, signals.

A training script supplies a ``TrainTask`` (its modules, optimizers, one training step, how to save
the user-facing model); ``Trainer`` does the rest. Guarantees:

- exact resume: N steps straight and N/2 steps + kill + resume give bit-identical weights on the CPU
  (same seed, data order, augmentation seeds, RNG states, LR position, optimizer and EMA state);
- a checkpoint is either whole or ignored (see ``pipelines.checkpoint``);
- SIGTERM / SIGINT finish the current step, write a checkpoint and return normally (the result's
  ``signal`` holds its number; the CLI then exits 128 + it: ``train_utils.exit_status``);
- any number of processes (``accelerate launch``): ``train.batch_size`` stays the global batch, checkpoints
  load on any number (what stays exact: ``pipelines.distributed``, docs/distributed.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipelines.checkpoint import CheckpointError, atomic_write_text, latest_checkpoint, list_checkpoints, \
    load_checkpoint, save_checkpoint
from pipelines.config import config_hash, parse_yaml
from pipelines.sampler import SeededDataset, build_batch_sampler
from pipelines.train_utils import (EMA, TIME_LIMIT, StopVote, TrainConfig, adamw, clip_divisor, code_signum,
                                   extra_buffers, load_extra_buffers, lr_factor, match_state_layouts, rng_state,
                                   signal_code, stopped_line, torch_optimizer)
from pipelines import distributed, fsdp_utils

__all__ = ["TrainConfig", "TrainTask", "Trainer", "adamw", "lr_factor"]
logger = logging.getLogger(__name__)


@runtime_checkable
class TrainTask(Protocol):
    """What a training script supplies. Optional extras the Trainer uses when present:

    - ``bind_modules(prepared: dict[str, nn.Module])``: the accelerate-wrapped (DDP/FSDP/compiled)
      modules; ``train_step`` must run its forwards through these for gradients to be synchronised.
    - ``sample(step, out_dir)``: writes a sample grid every ``sample_every`` steps (main process).
    - ``metrics: dict[str, float | Tensor]``: set by ``train_step``; averaged and logged.
    - ``throughput_unit: str`` (e.g. "images") and ``units_per_item: int``: logs ``<unit>_per_s``.
    - ``compile_modules()``: what ``compile: true`` does for this task, in place (instead of wrapping
      "model" in ``torch.compile``), e.g. when only parts of the model may be compiled.
    """

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules, "model" first; all are checkpointed."""

    def optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        """Ordered optimizers (build them with ``trainer.adamw``); the LR schedule scales each."""

    def train_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Losses keyed by optimizer name; each must give gradients only to its optimizer's params."""

    def save_model(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        """Write the user-facing model dir (config.json + model.safetensors) from plain modules."""


class Trainer:
    def __init__(self, train_config: TrainConfig, output_dir: str | Path, task: TrainTask, dataset: Dataset,
                 resume: bool = False, run_config: dict | None = None, sampler_weights: torch.Tensor | None = None):
        self.config, self.output_dir, self.task, self.dataset = train_config, Path(output_dir), task, dataset
        self.resume, self.sampler_weights = resume, sampler_weights
        self.run_config = json.loads(json.dumps(run_config)) if run_config is not None else None
        mp = train_config.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        plugin = fsdp_utils.plugin(mp) if train_config.distributed == "fsdp" else None
        self.accelerator = Accelerator(mixed_precision=mp, fsdp_plugin=plugin)
        distributed.check_launch(self.accelerator, train_config.distributed)
        self._stop_signal: str | None = None     # what stopped the run: a signal's name, the time limit, a peer
        self._stop_signum: int | None = None     # the signal's number when one stopped it (this rank's or a peer's)
        self._saved_run_config: dict | None = None

    # ------------------------------------------------------------------ setup
    def _check_run_config(self, saved: dict | None) -> None:
        if self.run_config is None or saved is None:
            return
        diffs = _diff(saved.get("model"), self.run_config.get("model"), "model")
        if diffs:
            raise ValueError(f"cannot resume {self.output_dir}: the model config differs from the saved run at "
                             + ", ".join(diffs))

    def _write_run_yaml(self) -> None:
        if self.run_config is None or not self.accelerator.is_main_process:
            return
        text = f"# {shlex.join(['tessera', *sys.argv[1:]]) if sys.argv[1:] else 'written by tessera.Trainer'}\n"
        atomic_write_text(self.output_dir / "run.yaml", text + yaml.safe_dump(self.run_config, sort_keys=False))

    def _setup(self) -> None:
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.seed, device_specific=True)  # rank r: seed + r, so ranks draw different dropout / masks
        # first, so that a dataset smaller than one batch fails before any work
        self.sampler = build_batch_sampler(self.dataset, cfg.batch_size, cfg.grad_accum, acc.num_processes,
                                           acc.process_index, cfg.seed, self.sampler_weights)
        if acc.is_main_process:
            logger.info("global batch %d = %d process(es) x %d accumulation step(s) x %d per device; %s data order",
                        cfg.batch_size, acc.num_processes, cfg.grad_accum, self.sampler.micro_batch,
                        self.sampler.kind)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt = None
        if self.resume:
            path = latest_checkpoint(self.output_dir)
            if path is None and list_checkpoints(self.output_dir):   # never start over a run's damaged history
                names = ", ".join(p.name for _, p in list_checkpoints(self.output_dir))
                raise CheckpointError(f"--resume: no checkpoint of {self.output_dir} passes verification ({names}; "
                                      f"the warnings above say why); move them away to start fresh")
            if path is None:
                logger.warning("--resume: %s has no checkpoint; starting fresh", self.output_dir)
            else:
                ckpt = load_checkpoint(path)
                run_yaml = self.output_dir / "run.yaml"
                saved = ckpt.state.get("run_config")
                if saved is None and run_yaml.is_file():
                    saved = parse_yaml(run_yaml.read_text())
                self._check_run_config(saved)
                self._saved_run_config = saved
        elif list_checkpoints(self.output_dir):
            raise ValueError(f"{self.output_dir} already holds checkpoints; pass --resume to continue that run "
                             f"or choose a new output dir")
        if acc.is_main_process:   # the log continues from the checkpoint (a fresh run: from nothing)
            truncate_log(self.output_dir / "metrics.jsonl", int(ckpt.state.get("step", 0)) if ckpt else 0)
        self._write_run_yaml()

        self.raw = dict(self.task.modules())
        if cfg.ema_decay > 0 and "model" not in self.raw:
            raise ValueError("ema_decay > 0 needs a module named 'model' in task.modules()")
        for m in self.raw.values():
            m.to(acc.device)
        self.optimizers = dict(self.task.optimizers(cfg))
        self.base_lrs = {n: [g["lr"] for g in o.param_groups] for n, o in self.optimizers.items()}
        self.ema = EMA(self.raw["model"], cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "nonfinite_total": 0, "nonfinite_streak": 0}
        if ckpt is not None:
            self._restore_weights(ckpt)
            note = distributed.continue_on_new_world(self.state, ckpt.state, self.sampler, acc.num_processes,
                                                     cfg.batch_size)
            if note and acc.is_main_process:
                logger.warning(note)
            self._continue_in_epoch()
        self.shadow = fsdp_utils.shadow_copies(self.raw) if fsdp_utils.is_fsdp(acc) else None

        to_prepare = dict(self.raw)
        compile_model, fsdp = cfg.compile and "model" in to_prepare, fsdp_utils.is_fsdp(acc)
        if compile_model and hasattr(self.task, "compile_modules"):
            self.task.compile_modules()
            compile_model = False
        if compile_model and not fsdp:
            to_prepare["model"] = torch.compile(to_prepare["model"])
        names, opt_names = list(to_prepare), list(self.optimizers)
        prepared = acc.prepare(*to_prepare.values(), *self.optimizers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.prepared = dict(zip(names, prepared[:len(names)]))
        if compile_model and fsdp:  # FSDP wraps the plain module, then compile (PyTorch's order for FSDP1)
            self.prepared["model"] = torch.compile(self.prepared["model"])
        self.optimizers = dict(zip(opt_names, prepared[len(names):]))
        if ckpt is not None and fsdp_utils.is_fsdp(acc):
            fsdp_utils.load_optimizers(self.prepared, self.optimizers, ckpt.optimizer_states)
        for opt in self.optimizers.values():   # resumed moments vs parameters laid out anew (NHWC or not)
            match_state_layouts(opt)
        if hasattr(self.task, "bind_modules"):
            self.task.bind_modules(self.prepared)

        self._data_iter = None
        self._resumed_from = ckpt.path if ckpt is not None else None
        if ckpt is not None:  # last: nothing above may draw from the restored RNG
            distributed.restore_rng(ckpt.tensors, acc.process_index, cfg.seed, self.state["step"])
            logger.info("resumed from %s (step %d, epoch %d)", ckpt.path, self.state["step"], self.state["epoch"])

    def _restore_weights(self, ckpt) -> None:
        for name, module in self.raw.items():
            if name not in ckpt.tensors:
                raise ValueError(f"checkpoint {ckpt.path} has no weights for module '{name}'")
            try:
                module.load_state_dict(ckpt.tensors[name], strict=True)
            except RuntimeError as e:     # e.g. a changed loss.disc_layers: the discriminator has other shapes
                changed = [d for section, given in (self.run_config or {}).items() if section != "train"
                           for d in _diff((self._saved_run_config or {}).get(section), given, section)]
                why = f" (changed since the saved run: {', '.join(changed)})" if changed else ""
                raise ValueError(f"cannot resume {self.output_dir}: the checkpoint's '{name}' weights do not fit "
                                 f"the module this config builds{why}: {' '.join(str(e).split())[:300]}") from e
            load_extra_buffers(module, ckpt.tensors.get(f"{name}.buffers", {}))
        if self.ema is not None:
            if "ema" not in ckpt.tensors:
                raise ValueError(f"checkpoint {ckpt.path} has no EMA weights but ema_decay > 0")
            self.ema.load_state_dict(ckpt.tensors["ema"])
        if set(ckpt.optimizer_states) != set(self.optimizers):
            raise ValueError(f"checkpoint {ckpt.path} has optimizers {sorted(ckpt.optimizer_states)}, "
                             f"the task has {sorted(self.optimizers)}")
        if not fsdp_utils.is_fsdp(self.accelerator):  # FSDP loads after wrapping
            for name, opt in self.optimizers.items():
                opt.load_state_dict(ckpt.optimizer_states[name])
        for key in self.state:
            self.state[key] = int(ckpt.state.get(key, 0))

    def _continue_in_epoch(self) -> None:
        """A resumed position in units of the current batch and dataset: a changed train.batch_size (or data
        that gained or lost items) makes it inexact, said once; past the end of the epoch, the next begins."""
        st, saved = self.state, (self._saved_run_config or {}).get("train", {}).get("batch_size")
        if saved is not None and saved != self.config.batch_size and self.accelerator.is_main_process:
            logger.warning("train.batch_size changed from %s to %s: the resumed run continues epoch %d at step %d "
                           "of the new batch size, so the items of this epoch are not exactly those of one run",
                           saved, self.config.batch_size, st["epoch"], st["step_in_epoch"])
        steps = self.sampler.steps_in_epoch(st["epoch"])
        if st["step_in_epoch"] >= steps:
            if self.accelerator.is_main_process:
                logger.warning("resumed at step %d of epoch %d, which now has %d steps: epoch %d starts",
                               st["step_in_epoch"], st["epoch"], steps, st["epoch"] + 1)
            st["epoch"], st["step_in_epoch"] = st["epoch"] + 1, 0

    # ------------------------------------------------------------------ data
    def _next_batch(self):
        if self._data_iter is None:
            epoch = self.state["epoch"]
            self.sampler.set_position(epoch, self.state["step_in_epoch"])
            if hasattr(self.sampler, "rank_shards") and hasattr(self.dataset, "retain_shards"):
                self.dataset.retain_shards(self.sampler.rank_shards(epoch))   # free last epoch's shards
            loader = DataLoader(SeededDataset(self.dataset, self.config.seed), batch_sampler=self.sampler,
                                num_workers=self.config.num_workers, pin_memory=torch.cuda.is_available(),
                                generator=torch.Generator().manual_seed(self.config.seed + epoch),
                                worker_init_fn=_ignore_stop_signals)
            self._data_iter = iter(loader)
        try:
            return next(self._data_iter)
        except StopIteration:  # the epoch is used up; the state has moved to the next epoch
            self._data_iter = None
            if self.state["step_in_epoch"] != 0:
                raise RuntimeError(f"epoch {self.state['epoch']} ended at step {self.state['step_in_epoch']} "
                                   f"without moving to the next epoch") from None
            return self._next_batch()

    # ------------------------------------------------------------------ one step
    @property
    def _fused(self) -> bool:
        """Every optimizer is a fused torch one (CUDA AdamW): non-finite steps are skipped on the device."""
        return all(torch_optimizer(o).defaults.get("fused") for o in self.optimizers.values())

    def _train_step(self) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, float]:
        """One optimizer step. Returns the losses (one per optimizer), the metrics (tensors stay on the
        device), ``bad`` (0-dim: 1.0 if the step was skipped as non-finite) and the data-wait seconds."""
        acc, cfg, step = self.accelerator, self.config, self.state["step"]
        wait, losses_micro, metrics = 0.0, [], {}
        for a in range(cfg.grad_accum):
            t = time.perf_counter()
            batch = send_to_device(self._next_batch(), acc.device, non_blocking=True)
            wait += time.perf_counter() - t
            with contextlib.ExitStack() as stack:
                if a < cfg.grad_accum - 1:  # accumulate locally; synchronise on the last micro-batch
                    for m in self.prepared.values():
                        stack.enter_context(acc.no_sync(m))
                with acc.autocast():
                    losses = self.task.train_step(batch, step)
                if list(losses) != list(self.optimizers):
                    raise ValueError(f"train_step returned losses {list(losses)}; expected one per optimizer, "
                                     f"in order: {list(self.optimizers)}")
                # one backward of the sum == one backward per loss, as each loss reaches only its own params
                grads = [l.float() for l in losses.values() if l.requires_grad]
                if grads:
                    acc.backward(sum(grads) / cfg.grad_accum)
            losses_micro.append(torch.stack([l.detach().float().reshape(()) for l in losses.values()]))
            for k, v in getattr(self.task, "metrics", {}).items():
                metrics.setdefault(k, []).append(v.detach().float() if torch.is_tensor(v) else float(v))
        loss_N = torch.stack(losses_micro).mean(0)
        finite = torch.isfinite(loss_N).all().float()
        norms, divisors = {}, {}
        # the gradient norm of every optimizer, clipped or not (grad_clip 0: max norm inf, the gradients are
        # multiplied by 1): a non-finite gradient behind a finite loss must skip the step too. Fused AdamW
        # (not under FSDP, whose norm spans the ranks' shards) clips inside its own kernel: its grad_scale input
        fused = self._fused
        clip_in_step = cfg.grad_clip > 0 and fused and not fsdp_utils.is_fsdp(acc)
        for name, opt in self.optimizers.items():
            params = fsdp_utils.clip_params(acc, self.prepared, name, opt)
            if params and clip_in_step:
                norms[name], divisors[name] = clip_divisor([p.grad for p in params], cfg.grad_clip)
            elif params:
                norms[name] = acc.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if norms:
            norm_N = torch.stack([n.float().to(finite.device) for n in norms.values()])
            finite = finite * torch.isfinite(norm_N).all()
        bad = 1.0 - finite.to(acc.device)
        if acc.num_processes > 1:  # every rank must agree to step or skip
            bad = acc.reduce(bad, "max")
        # fused AdamW skips a non-finite step on the device (its found_inf input, as GradScaler uses it):
        # no host sync, so the host queues the next step while this one runs; else decide here
        skip_on_device = fused
        if skip_on_device or bad.item() == 0:
            factor = lr_factor(step, cfg)
            for name, opt in self.optimizers.items():
                for group, base in zip(opt.param_groups, self.base_lrs[name]):
                    group["lr"] = base * factor
                inner = torch_optimizer(opt)
                inner.found_inf = bad if skip_on_device else None
                inner.grad_scale = divisors.get(name)
                try:
                    opt.step()
                finally:
                    del inner.found_inf, inner.grad_scale
            if self.ema is not None:
                self.ema.update(self.raw["model"], keep=1.0 - bad if skip_on_device else None)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        out = {f"grad_norm/{k}": v.detach().float() for k, v in norms.items()}
        for k, v in metrics.items():  # mean over micro-batches
            out[k] = torch.stack(v).mean() if torch.is_tensor(v[0]) else sum(v) / len(v)
        return loss_N, out, bad, wait

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        tensors = fsdp_utils.module_states(acc, self.raw, self.prepared)  # gathers under FSDP
        opt_states = fsdp_utils.optimizer_states(acc, self.prepared, self.optimizers)
        rng_ranks = distributed.gather_rng(acc)
        path = None
        if acc.is_main_process:
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            tensors["rng"] = rng_state()
            if rng_ranks is not None:
                tensors["rng_ranks"] = rng_ranks
            if self.shadow is None:
                tensors.update({f"{n}.buffers": b for n, m in self.raw.items() if (b := extra_buffers(m))})
            state = dict(self.state, run_config=self.run_config, world_size=acc.num_processes,
                         data_order=self.sampler.kind)
            chash = config_hash(self.run_config["model"]) if self.run_config and "model" in self.run_config else None
            path = save_checkpoint(self.output_dir, self.state["step"], tensors, opt_states, state,
                                   self.config.keep_checkpoints, chash)
            modules = fsdp_utils.load_shadows(self.shadow, tensors) if self.shadow is not None else dict(self.raw)
            if self.ema is not None:
                modules["model"] = self.ema.module
            self.task.save_model(self.output_dir, modules)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._stop_signal, self._stop_signum = name, signum
            logger.warning("received %s: finishing the current step, then writing a checkpoint", name)

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_request(self) -> int:
        """This rank's stop request as ``StopVote``'s code: 0 none, ``TIME_LIMIT``, or the signal's ``signal_code``."""
        if self._stop_signal is None:
            return 0
        return signal_code(self._stop_signum) if self._stop_signum else TIME_LIMIT

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or until a signal); return the last logged metrics plus "step"."""
        with self._signals():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        self._setup()
        acc, cfg, st = self.accelerator, self.config, self.state
        main = acc.is_main_process
        metrics_path, samples_dir = self.output_dir / "metrics.jsonl", self.output_dir / "samples"
        window: dict[str, list] = {}
        last: dict[str, Any] = {}
        saved_at = st["step"] if self.resume and st["step"] > 0 else -1
        path = self._resumed_from
        bar = tqdm(total=cfg.max_steps, initial=st["step"], disable=not main, desc="train", dynamic_ncols=True)
        unit, per_item = getattr(self.task, "throughput_unit", None), getattr(self.task, "units_per_item", 1)

        pending: list[tuple[int, torch.Tensor, torch.Tensor, dict]] = []   # steps whose finiteness is unread

        def settle():
            """Read the pending steps' flags and losses (one host sync): skipped steps are counted and
            warned about, a run of ``max_nonfinite`` stops training, the others enter the log window."""
            if not pending:
                return
            bad_P = torch.stack([b.reshape(()).float() for _, b, _, _ in pending]).tolist()
            loss_PN = torch.stack([l for _, _, l, _ in pending]).tolist()
            for (step, _, _, step_metrics), bad, losses in zip(pending, bad_P, loss_PN):
                if bad == 0:
                    st["nonfinite_streak"] = 0
                    for name, v in zip(self.optimizers, losses):
                        window.setdefault(f"loss/{name}", []).append(v)
                    for k, v in step_metrics.items():
                        window.setdefault(k, []).append(v)
                    continue
                st["nonfinite_total"] += 1
                st["nonfinite_streak"] += 1
                logger.warning("non-finite loss or gradient at step %d (%s): step skipped (%d in a row)",
                               step, dict(zip(self.optimizers, losses)), st["nonfinite_streak"])
                if st["nonfinite_streak"] >= cfg.max_nonfinite:
                    bar.close()
                    good = latest_checkpoint(self.output_dir)
                    raise RuntimeError(
                        f"training stopped at step {step}: {st['nonfinite_streak']} non-finite steps in a row "
                        f"(train.max_nonfinite = {cfg.max_nonfinite}); last good checkpoint: {good or 'none'}. "
                        "Lower train.lr or check the data.")
            pending.clear()

        def flush_log():
            nonlocal last, window_t0, window_step0
            settle()
            steps = st["step"] - window_step0
            if not steps:
                return
            elapsed = time.perf_counter() - window_t0   # after settle's sync: the window's GPU work is done
            wait = sum(window.pop("wait_s", []))
            keys = sorted(window)
            vals = torch.tensor([sum(float(v) for v in window[k]) / len(window[k]) for k in keys], device=acc.device)
            vals = acc.reduce(vals, "mean") if acc.num_processes > 1 else vals
            rec = {"step": st["step"], "epoch": st["epoch"], **dict(zip(keys, vals.tolist())),
                   "step_time": elapsed / steps, "data_wait": wait / max(elapsed, 1e-9),
                   "nonfinite_total": st["nonfinite_total"]}
            rec["lr"] = self.base_lrs[next(iter(self.base_lrs))][0] * lr_factor(max(st["step"] - 1, 0), cfg)
            if unit:
                rec[f"{unit}_per_s"] = cfg.batch_size * per_item / rec["step_time"]
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix({k.removeprefix("loss/"): f"{v:.4g}" for k, v in rec.items() if k.startswith("loss/")}
                                | {"lr": f"{rec['lr']:.2e}"}, refresh=False)
            window.clear()
            window_t0, window_step0 = time.perf_counter(), st["step"]
            last = rec

        started, window_t0, window_step0 = time.monotonic(), time.perf_counter(), st["step"]
        vote = StopVote(acc) if acc.num_processes > 1 else None   # all ranks stop at the same step
        stop = vote is None and self._stop_signal is not None
        while st["step"] < cfg.max_steps and not stop:
            loss_N, step_metrics, bad, wait = self._train_step()
            st["step"] += 1
            st["step_in_epoch"] += 1
            if st["step_in_epoch"] >= self.sampler.steps_in_epoch(st["epoch"]):
                st["epoch"], st["step_in_epoch"] = st["epoch"] + 1, 0
            pending.append((st["step"], bad, loss_N, step_metrics))
            window.setdefault("wait_s", []).append(wait)
            if not self._fused:   # the host already knows (it synced in the step): act on it now
                settle()
            bar.update(1)
            if st["step"] % cfg.log_every == 0:
                flush_log()
            if cfg.sample_every and st["step"] % cfg.sample_every == 0 and hasattr(self.task, "sample"):
                t = time.perf_counter()
                if main:
                    samples_dir.mkdir(parents=True, exist_ok=True)
                    self.task.sample(st["step"], samples_dir)
                acc.wait_for_everyone()
                window_t0 += time.perf_counter() - t   # sampling is not training time
            if cfg.max_minutes and time.monotonic() - started > 60 * cfg.max_minutes and self._stop_signal is None:
                self._stop_signal = f"the time limit (train.max_minutes = {cfg.max_minutes})"
            if cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0:
                settle()   # the checkpoint's counters include every step before it
                t = time.perf_counter()
                path, saved_at = self._save(), st["step"]
                window_t0 += time.perf_counter() - t   # nor is writing checkpoints
            if vote is None:
                stop = self._stop_signal is not None
            elif code := vote(request := self._stop_request()):   # some rank's request, one step ago
                if code > request:                       # a peer's, or its signal where this rank hit the time limit
                    self._stop_signum = code_signum(code)
                    self._stop_signal = ("a peer's time limit" if self._stop_signum is None
                                         else f"a peer's {signal.Signals(self._stop_signum).name}")
                stop = True
        flush_log()
        bar.close()
        if saved_at != st["step"] and (st["step"] > 0 or cfg.max_steps == 0):
            path = self._save()
        result = dict(last, step=st["step"], stopped_by=self._stop_signal, signal=self._stop_signum,
                      checkpoint=str(path) if path else None)
        if self._stop_signal is not None:       # the one line the user sees about it (the CLIs print none of their own)
            logger.warning("%s", stopped_line(result))
        return result


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT. `timeout`, schedulers, `kill -- -PGID` and Ctrl-C in
    a terminal signal the whole process group; a worker that died of it would make PyTorch raise in the
    main process while the Trainer finishes its step and writes its last checkpoint. The workers still
    end with the loader (or their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def truncate_log(path: Path, step: int) -> None:
    """A resumed run's metrics log: drop the lines of steps after the checkpoint it resumes from (the run
    logs them again), so every step appears once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _logged_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")     # a torn last line of a killed run: dropped


def _diff(a: Any, b: Any, where: str) -> list[str]:
    """Keys at which two nested config dicts differ, as 'model.x (saved A, given B)'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [f"{where} (saved {a!r}, given {b!r})"]
