"""The end-to-end pipeline (`bsnas run --config C`): train the supernet (broadening and
shrinking), search it, export the best architecture with its inherited weights, retrain
it briefly, and write the report.

Everything goes into `cfg.out_dir`:

    ckpt-*.pt, epochs.csv, train_log.csv, shrink_log.json, ...   training (bsnas.train,
                                                                  bsnas.strategy.shrinking)
    training_curves.png                                          (bsnas.pipeline.plots)
    search/         best_arch.json, candidates.csv, pareto.csv/png (bsnas.strategy.evolution)
    model.pt        the best architecture exported with inherited weights (bsnas.export)
    retrain/        retrain.json, model.pt (bsnas.pipeline.retrain)
    report/         report.md and its plots (bsnas.pipeline.report)
    run.json        seconds per phase and the headline numbers

`resume=True` continues an interrupted run: training from its newest checkpoint, the
search from its saved state; export, retraining and the report are redone. A fresh run
refuses a folder that holds another run, unless `overwrite=True` deletes that run first.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from bsnas.export import export
from bsnas.pipeline.plots import plot_curves, plot_pareto
from bsnas.pipeline.report import write_report
from bsnas.pipeline.retrain import retrain
from bsnas.strategy.evolution import Constraints, EvolutionParams, search_supernet
from bsnas.strategy.shrinking import Shrinker
from bsnas.train.checkpoint import latest_checkpoint, save_json_atomic
from bsnas.train.trainer import Trainer

__all__ = ["build_trainer", "plot_training_curves", "run"]

log = logging.getLogger(__name__)


def plot_training_curves(trainer: Trainer) -> None:
    """Finish hook of the trainer: training_curves.png in its output folder (main rank)."""
    if trainer.dist.main:
        plot_curves(trainer.out_dir)


def build_trainer(cfg, resume: bool = False, overwrite: bool = False) -> Trainer:
    """A `Trainer` for `cfg` that plots its curves when training ends, with the
    `Shrinker` hook when `cfg.shrink.enabled`. A fresh run (neither `resume` nor
    `overwrite`) refuses an out_dir that holds another run (bsnas.train.run_folder)."""
    trainer = Trainer(cfg, resume, overwrite)
    trainer.finish_hooks.append(plot_training_curves)
    if cfg.shrink.enabled:
        s = cfg.shrink
        if trainer.dist.main and s.start < cfg.broaden.warmup_epochs + cfg.broaden.broaden_epochs:
            log.warning("shrink.start (%d) precedes the end of broadening (epoch %g): narrow widths "
                        "are judged before they were trained", s.start,
                        cfg.broaden.warmup_epochs + cfg.broaden.broaden_epochs)
        trainer.epoch_hooks.append(Shrinker.from_config(cfg))
    return trainer


def run(cfg, resume: bool = False, progress: Callable[[str], None] | None = None,
        overwrite: bool = False) -> dict:
    """Run the whole pipeline for `cfg` (see the module doc); returns `run.json`'s
    content, including `report` (the path of report.md). `progress` receives one line
    per phase (the details go to the `logging` module). Single process. Without
    `resume`, an out_dir holding another run is refused unless `overwrite`, which first
    deletes that run's files (bsnas.train.run_folder)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("`bsnas run` runs in one process; only `bsnas train` runs under torchrun "
                         "(then `bsnas search` and `bsnas retrain`)")
    # settings of the later phases are checked before hours of training, not after
    EvolutionParams.from_config(cfg.search)
    Constraints.from_config(cfg.search)
    say = progress or (lambda line: None)
    out = cfg.out_dir
    seconds = {}

    tic = time.perf_counter()
    trainer = build_trainer(cfg, resume, overwrite)
    say(f"[1/4] training the supernet: {cfg.train.epochs} epochs of {trainer.steps_per_epoch} steps "
        f"on {trainer.device} -> {out}")
    trainer.fit()
    seconds["train"] = time.perf_counter() - tic
    checkpoint = latest_checkpoint(out)

    tic = time.perf_counter()
    say(f"[2/4] evolutionary search over {trainer.enabled.size():.3e} architectures")
    tag = {"checkpoint_step": trainer.step, "checkpoint_epoch": trainer.epoch, "space": trainer.space.name}
    result = search_supernet(cfg, trainer.supernet, trainer.enabled, trainer.data,
                             os.path.join(out, "search"), resume, tag, plot=plot_pareto)
    best = result.best
    seconds["search"] = time.perf_counter() - tic

    tic = time.perf_counter()
    model_path = os.path.join(out, "model.pt")
    torch.save(export(trainer.supernet, best.arch), model_path)
    say(f"[3/4] exported {best.arch} -> {model_path}; retraining {cfg.retrain.epochs} epochs "
        f"({'inherited weights' if cfg.retrain.inherit else 'from scratch'})")
    report = retrain(cfg, best.arch, out_dir=os.path.join(out, "retrain"), supernet=trainer.supernet,
                     data=trainer.data)
    seconds["retrain"] = time.perf_counter() - tic

    tic = time.perf_counter()
    path = write_report(out)
    seconds["report"] = time.perf_counter() - tic
    say(f"[4/4] report: {path}")
    last = trainer.history[-1] if trainer.history else {}
    summary = {"report": path, "checkpoint": checkpoint, "model": model_path,
               "best_arch": os.path.join(out, "search", "best_arch.json"),
               "best": best.to_dict(), "val_top1": report["val_top1"], "val_top5": report["val_top5"],
               "supernet_holdout_top1": last.get("holdout_top1"),
               "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    save_json_atomic(summary, os.path.join(out, "run.json"))
    return summary
