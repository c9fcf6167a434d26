"""The supernet trainer (`bsnas train --config C`): single-path sampling over the enabled
space, the broadening schedule, SGD with warm-up and cosine/linear decay, optional
strict-fairness sampling and bf16 autocast, DDP through torchrun, atomic checkpoints
that resume exactly, and progress/CSV/TensorBoard logging. Process set-up (devices,
seeding, data, schedules) lives in `bsnas.train.runtime`.

Data flow: config -> space -> supernet -> Trainer. Shrinking plugs in through
`Trainer.epoch_hooks` (called after every epoch with the trainer and the epoch), and
whatever follows training (the pipeline's plot of the curves) through
`Trainer.finish_hooks` (called once training ends, with the trainer), so this module
knows about neither.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bsnas.config import Config
from bsnas.evaluator import evaluate_path
from bsnas.space import SKIP, Arch, EnabledSpace, LayerChoice, PathSampler, kernel_size, load_space
from bsnas.supernet import Supernet
from bsnas.train import collectives
from bsnas.train.broadening import BroadeningSchedule
from bsnas.train.checkpoint import (CheckpointError, load_checkpoint, load_newest_good, mismatch,
                                    remove_temporaries, save_checkpoint)
from bsnas.train.nonfinite import FiniteGuard, NonFiniteError
from bsnas.train.run_folder import RUN_FOLDERS, cut_logs, prepare_fresh
from bsnas.train.rank_sync import step_bn_stats
from bsnas.train.runtime import (append_csv_row, build_data, init_distributed, lr_lambda, param_groups,
                                 pick_device, rng_state, seed_everything, set_rng_state)

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


def _short(arch) -> str:
    return ",".join(str(c) for c in arch.layers)


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Builds everything from `cfg` and trains; `fit()` runs to `train.epochs`."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise ValueError("--resume continues the run in out_dir, --overwrite replaces it: give one")
        self.cfg = cfg
        self.dist = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = pick_device(cfg.device, self.dist, cfg.keep_freed_memory)
        self.out_dir = cfg.out_dir
        self._prepare_folder(resume, overwrite)
        seed_everything(cfg.seed, cfg.deterministic)
        self.space = load_space(cfg.space)
        self.data = build_data(cfg, self.space, self.device, self.dist)
        self.supernet = Supernet(self.space).to(self.device)
        if cfg.train.channels_last:
            self.supernet.to(memory_format=torch.channels_last)
        self.guard = FiniteGuard(self.supernet)  # after every .to(): it holds the buffers
        self.enabled = EnabledSpace(self.space)
        self.sampler = PathSampler(self.enabled, cfg.seed)
        self.broadening = BroadeningSchedule(self.enabled, cfg.broaden.warmup_epochs,
                                             cfg.broaden.broaden_epochs)
        t = cfg.train
        global_batch = cfg.data.batch_size * self.dist.world_size
        self.optimizer = torch.optim.SGD(param_groups(self.supernet, t.weight_decay),
                                         lr=t.lr * global_batch / 256, momentum=t.momentum,
                                         nesterov=t.nesterov and t.momentum > 0)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} exceeds the training images per process")
        self.total_steps = t.epochs * self.steps_per_epoch
        warmup = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, t.schedule))
        self.epoch_hooks: list = []   # callables (trainer, epoch) after each epoch
        self.finish_hooks: list = []  # callables (trainer) once training ends, on every rank
        self.history: list[dict] = []  # one row per epoch
        self.extra_state: dict = {}   # checkpointed state of hooks, by name
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._epoch_sums = self._new_epoch_sums()
        self._stages = self.broadening.stages(0.0)
        if self.dist.main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        if resume:
            self.resume()
        self._writer = self._tensorboard()

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        """Before anything is written to out_dir: a fresh run refuses a folder that holds
        another run's files unless `overwrite` (the main rank then deletes them, and
        only them); the temporaries of killed writes are removed. Under torchrun every
        rank checks before any rank writes, and all stop when one refuses."""
        refused = None
        if not resume:
            try:
                prepare_fresh(self.out_dir, overwrite, remove=False)
            except ValueError as e:
                refused = e
        if self.dist.world_size > 1:
            flag = torch.tensor([0.0 if refused is None else 1.0], device=self.device)
            collectives.all_reduce(flag)  # also the barrier before the main rank writes
            if refused is None and flag.item() > 0:
                refused = ValueError(f"run folder {self.out_dir} was refused on another rank")
        if refused is not None:
            raise refused
        if self.dist.main:
            if overwrite:
                prepare_fresh(self.out_dir, overwrite)
            for folder in (self.out_dir, *(os.path.join(self.out_dir, d) for d in RUN_FOLDERS)):
                remove_temporaries(folder)

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return self.supernet.checkpoint(
            self.enabled,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
            stages=list(self._stages), history=self.history, rng=rng_state(),
            extra_state=self.extra_state, config=self.cfg.to_dict(),
            epoch_sums=dict(self._epoch_sums))

    @staticmethod
    def _new_epoch_sums() -> dict:
        """Running sums of the current epoch (checkpointed: a resumed epoch's mean
        training loss covers the whole epoch)."""
        return {"loss": 0.0, "steps": 0, "skipped": 0}

    def save(self) -> str | None:
        if not self.dist.main:
            return None
        bad = self.guard.check_state()
        if bad is not None:  # a checkpoint never holds NaN/inf
            raise NonFiniteError(f"not writing the checkpoint of step {self.step}: non-finite {bad}")
        path = save_checkpoint(self.state(), self.out_dir, self.step,
                               self.cfg.train.keep_checkpoints)
        log.info("checkpoint %s (epoch %d, step %d)", path, self.epoch, self.step)
        return path

    def resume(self, path: str | None = None) -> bool:
        """Continue from `path` or else the newest good checkpoint in out_dir (damaged
        newer ones are set aside with a warning naming both); False if there is none.
        CheckpointError when the checkpoint was written for another space or supernet.
        The CSV logs lose the rows written after the checkpoint (each step logged once)."""
        if path is None:
            found = load_newest_good(self.out_dir, map_location=self.device)
            if found is None:
                log.info("no checkpoint in %s: starting fresh", self.out_dir)
                if self.dist.main:
                    cut_logs(self.out_dir, 0, 0)
                return False
            path, ckpt = found
        else:
            ckpt = load_checkpoint(path, map_location=self.device)
        why = mismatch(ckpt, path, self.space.to_dict(), self.supernet.state_dict())
        if why is not None:
            raise CheckpointError(why)
        missing = [k for k in ("enabled", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch",
                               "stages", "history", "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"checkpoint {path} is not a training checkpoint (it has no "
                                  f"{', '.join(missing)}); resume needs one written by bsnas train")
        self.supernet.load_state_dict(ckpt["model"])
        self.enabled.load_state_dict(ckpt["enabled"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.batch_in_epoch = ckpt["batch_in_epoch"]
        self._stages = tuple(ckpt["stages"])
        self.history = ckpt["history"]
        self.extra_state = ckpt.get("extra_state", {})
        self._epoch_sums = dict(ckpt.get("epoch_sums") or self._new_epoch_sums())
        set_rng_state(ckpt["rng"])
        if self.dist.main:
            cut_logs(self.out_dir, self.step, self.epoch)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch,
                 self.batch_in_epoch, self.step)
        return True

    # ------------------------------------------------------------------ logging
    def _tensorboard(self):
        if not self.dist.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001  (tensorboard not installed)
            return None
        # a resumed run drops the events logged after its checkpoint, as cut_logs does
        return SummaryWriter(os.path.join(self.out_dir, "tensorboard"), purge_step=self.step or None)

    def _csv(self, name: str, row: dict) -> None:
        if self.dist.main:
            append_csv_row(os.path.join(self.out_dir, name), row)

    # ------------------------------------------------------------------ training
    def _broaden(self, epoch_float: float) -> None:
        """Apply a step of the broadening schedule: re-order the channels of every layer
        whose allowed range just grew, so narrow prefixes hold the strongest channels."""
        stages = self.broadening.stages(epoch_float)
        if stages == self._stages:
            return
        grown = [i for i, (a, b) in enumerate(zip(stages, self._stages)) if a != b]
        if self.cfg.broaden.reorder:
            for i in grown:
                for block in self.supernet.layers[i].blocks.values():
                    block.reorder_channels(self.optimizer)
        self._stages = stages
        if self.dist.main:
            allowed = [list(self.broadening.allowed(i, epoch_float)) for i in range(len(stages))]
            log.info("broadening at epoch %.2f: layers %s grow; allowed widths %s",
                     epoch_float, grown, allowed)
            self._csv("broadening.csv", {"step": self.step, "epoch": round(epoch_float, 4),
                                         "stages": " ".join(map(str, stages)),
                                         "reordered": " ".join(map(str, grown))})

    def _paths(self, epoch_float: float):
        allowed = lambda i: self.broadening.allowed(i, epoch_float)  # noqa: E731
        if self.cfg.train.sampling == "fair":
            return self.sampler.fair(self.step, allowed)
        return [self.sampler.uniform(self.step, allowed)]

    def _sync_step(self, paths, loss_sum: float, correct: float) -> tuple[float, float]:
        """Average over the ranks, in one all-reduce, what this step left different on
        each: the gradients, the BN running statistics the step updated
        (`step_bn_stats`) and the step's loss sum and correct count, which are returned
        (the logged loss and top-1 are then the means over all ranks' images)."""
        if self.dist.world_size <= 1:
            return loss_sum, correct
        # Every rank trained the same paths (the sampler is seeded by the step), so the
        # same parameters hold gradients and the same BN entries were updated. One
        # all-reduce of those, not DistributedDataParallel: DDP must reduce the whole
        # supernet for a single path and was slower (docs/performance.md).
        # BN statistics are averaged rather than broadcast from rank 0 (DDP's
        # broadcast_buffers): every rank's images then count, as in the gradient, and
        # they ride in the gradients' all-reduce, where a broadcast is one more collective.
        grads = [p.grad for p in self.supernet.parameters() if p.grad is not None]
        metrics = torch.tensor([loss_sum, correct], dtype=grads[0].dtype, device=grads[0].device)
        collectives.all_reduce_mean_(grads + step_bn_stats(self.supernet, paths) + [metrics])
        loss_sum, correct = metrics.tolist()
        return loss_sum, correct

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch_float: float) -> dict:
        self._broaden(epoch_float)
        paths = self._paths(epoch_float)
        if self.cfg.train.nonfinite == "skip_step":
            self.guard.snapshot()  # the BN statistics a skipped step puts back
        self.supernet.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = self.cfg.train.amp and self.device.type == "cuda"
        loss_sum, correct = 0.0, 0
        for arch in paths:
            self.supernet.activate(arch)
            with torch.autocast("cuda", torch.bfloat16, enabled=amp):
                logits = self.supernet(x)
                loss = F.cross_entropy(logits.float(), y,
                                       label_smoothing=self.cfg.train.label_smoothing)
            loss.backward()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y).sum().item()
        loss_sum, correct = self._sync_step(paths, loss_sum, correct)
        bad = self._check_finite(loss_sum)
        if bad is None:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": loss_sum / len(paths), "top1": correct / (len(paths) * y.numel()),
                "path": paths[-1], "skipped": bad}

    def _check_finite(self, loss: float) -> str | None:
        """None when this step's loss, gradients and BN statistics are all finite (one
        fused check). Otherwise, by `train.nonfinite`: raise NonFiniteError naming the
        step and the first bad tensor (stop), or put the BN statistics back, drop the
        gradients and return that name (skip_step: the caller skips the update)."""
        # Under torchrun every rank decides alike: the loss, the gradients and the step's BN
        # statistics were averaged over the ranks before, so a NaN on one is on all.
        bad = self.guard.check(loss)
        if bad is None:
            return None
        step = self.step + 1
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite {bad} at step {step} (epoch {self.epoch + 1}, batch "
                f"{self.batch_in_epoch + 1}): stopped before the update, no checkpoint holds it "
                f"(train.nonfinite=skip_step skips such steps)")
        self.guard.restore()
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: update skipped: non-finite %s", step, bad)
        return bad

    def fit(self) -> dict:
        """Train until `train.epochs`; returns the last epoch's summary."""
        t = self.cfg.train
        while self.epoch < t.epochs:
            self._run_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0
            for hook in self.epoch_hooks:
                hook(self, self.epoch)
            self.save()
        self._finish()
        return self.history[-1] if self.history else {}

    def _progress_bar(self) -> tqdm:
        """The epoch's progress bar (tqdm, on stderr): shown with `train.progress` on the
        main rank when stderr is a terminal, silent otherwise (logs and CI output)."""
        show = self.cfg.train.progress and self.dist.main and sys.stderr.isatty()
        return tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch:3d}",
                    unit="step", file=sys.stderr, dynamic_ncols=True, disable=not show)

    def _run_epoch(self) -> None:
        t, loader = self.cfg.train, self.data.train
        loader.set_epoch(self.epoch)
        sums, tic, seen = self._epoch_sums, time.perf_counter(), 0
        with self._progress_bar() as bar:
            for x, y in loader.iterate(self.batch_in_epoch):
                epoch_float = self.epoch + self.batch_in_epoch / self.steps_per_epoch
                out = self.train_step(x, y, epoch_float)
                self.batch_in_epoch += 1
                seen += y.numel() * self.dist.world_size
                if out["skipped"]:
                    sums["skipped"] += 1
                else:
                    sums["loss"] += out["loss"]
                    sums["steps"] += 1
                rate = seen / max(1e-9, time.perf_counter() - tic)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix_str(f"loss {out['loss']:.3f} lr {lr:.4f} {rate:.0f} img/s "
                                    f"path {_short(out['path'])}", refresh=False)
                bar.update(1)
                if self.step % t.log_every == 0:
                    self._csv("train_log.csv", {
                        "step": self.step, "epoch": round(epoch_float, 4), "loss": out["loss"],
                        "top1": out["top1"], "lr": lr, "images_per_s": round(rate, 1),
                        "path": _short(out["path"])})
                    if self._writer:
                        self._writer.add_scalar("train/loss", out["loss"], self.step)
                        self._writer.add_scalar("train/lr", lr, self.step)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                        and self.batch_in_epoch < self.steps_per_epoch:
                    self.save()
        row = {"epoch": self.epoch + 1, "step": self.step,
               "train_loss": sums["loss"] / sums["steps"] if sums["steps"] else float("nan"),
               "skipped_steps": sums["skipped"], "enabled_size": self.enabled.size()}
        self._epoch_sums = self._new_epoch_sums()
        every = t.eval_every
        if every and ((self.epoch + 1) % every == 0 or self.epoch + 1 == t.epochs):
            row.update(self._evaluate_largest())
        else:
            row.update(holdout_top1=float("nan"), val_top1=float("nan"), val_top5=float("nan"))
        self.history.append(row)
        self._csv("epochs.csv", row)
        if self._writer:
            for k in ("train_loss", "val_top1", "holdout_top1"):
                self._writer.add_scalar(f"epoch/{k}", row[k], self.epoch + 1)
        if self.dist.main:
            log.info("epoch %d: train loss %.4f, largest path: holdout top-1 %.4f, val top-1 %.4f",
                     self.epoch + 1, row["train_loss"], row["holdout_top1"], row["val_top1"])

    def _evaluate_largest(self) -> dict:
        """The largest enabled path after BN recalibration, on holdout and val (for the
        curves only: nothing is chosen from val)."""
        layers = []
        for i in range(self.enabled.num_layers):
            ops = self.enabled.kernel_ops(i)
            layers.append(LayerChoice(max(ops, key=kernel_size), max(self.enabled.widths(i)))
                          if ops else LayerChoice(SKIP))
        arch = Arch(self.space.name, layers)
        held = evaluate_path(self.supernet, arch, self.data.calib, self.data.holdout)
        val = evaluate_path(self.supernet, arch, self.data.calib, self.data.val)
        return {"holdout_top1": held["top1"], "val_top1": val["top1"], "val_top5": val["top5"]}

    def _finish(self) -> None:
        summary = {"steps": self.step, "epochs": self.epoch,
                   "history": self.history, "enabled": self.enabled.state_dict()}
        if self.dist.world_size > 1:
            summary["params_in_sync"] = self._params_in_sync()
        if self.dist.main:
            with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        for hook in self.finish_hooks:
            hook(self)
        if self._writer:
            self._writer.close()

    def _params_in_sync(self) -> bool:
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.supernet.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.dist.world_size)]
        collectives.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])
