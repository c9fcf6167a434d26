"""A run folder (`out_dir`): what bsnas writes there, the refusal to start a fresh run
in a folder that holds another run's files (unless it is resumed or overwritten), and
cutting the trainer's CSV logs back to the checkpoint a run resumes from, so that every
step and epoch is logged once."""
from __future__ import annotations

import csv
import io
import logging
import os
import shutil

from bsnas.train.checkpoint import DAMAGED_SUFFIX, PATTERN, TEMP_PATTERN, save_bytes_atomic

__all__ = ["RUN_FILES", "RUN_FOLDERS", "cut_logs", "prepare_fresh", "run_outputs"]

log = logging.getLogger(__name__)

#: Files bsnas writes into a run folder: training (bsnas.train, bsnas.strategy.shrinking),
#: then the later phases of `bsnas run` (bsnas.pipeline). Checkpoints (ckpt-*.pt) too.
RUN_FILES = ("config.json", "epochs.csv", "train_log.csv", "broadening.csv", "summary.json",
             "shrink_log.json", "training_curves.png", "model.pt", "run.json")
#: Sub-folders bsnas writes into a run folder.
RUN_FOLDERS = ("tensorboard", "search", "retrain", "report")

#: The trainer's CSV logs, the column that dates a row and the first value that lies past
#: a checkpoint of (step S, epoch E): a row logged after that checkpoint was written.
#: broadening.csv logs the step count before the step that broadens: S is already past.
_LOGS = (("train_log.csv", "step", lambda step, epoch: step + 1),
         ("broadening.csv", "step", lambda step, epoch: step),
         ("epochs.csv", "epoch", lambda step, epoch: epoch + 1))


def run_outputs(folder: str) -> list[str]:
    """The paths in `folder` that bsnas wrote there as part of a run (see RUN_FILES and
    RUN_FOLDERS), checkpoints and left-over temporaries included; sorted."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if (name in RUN_FILES and os.path.isfile(path)) or (name in RUN_FOLDERS and os.path.isdir(path)) \
                or PATTERN.search(name) or (name.endswith(DAMAGED_SUFFIX) and name.startswith("ckpt-")) \
                or TEMP_PATTERN.match(name):
            found.append(path)
    return sorted(found)


def prepare_fresh(folder: str, overwrite: bool, remove: bool = True) -> list[str]:
    """Before a fresh (not resumed) run in `folder`: ValueError when the folder holds a
    run's files, unless `overwrite`; with `overwrite` (and `remove`, i.e. on the process
    that writes) those files are deleted first, and nothing else. Returns what was (or,
    on the other processes, would be) deleted."""
    found = run_outputs(folder)
    if not found:
        return []
    if not overwrite:
        names = [os.path.basename(p) for p in found]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ValueError(f"run folder {folder} already holds a run ({shown}): pass --resume to "
                         f"continue it, --overwrite to replace it, or choose another out_dir")
    if remove:
        for path in found:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        log.warning("--overwrite: removed the previous run's %d file(s)/folder(s) from %s", len(found), folder)
    return found


def _cut_csv(path: str, column: str, first_past: int) -> int:
    """Drop the rows of CSV file `path` whose `column` is >= `first_past`, and rows that
    cannot be read (a line cut short by a kill); returns how many were dropped."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    if column not in header:
        return 0
    i = header.index(column)
    kept = []
    for row in body:
        try:
            ok = len(row) == len(header) and float(row[i]) < first_past
        except ValueError:
            ok = False
        if ok:
            kept.append(row)
    if len(kept) == len(body):
        return 0
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(kept)
    save_bytes_atomic(text.getvalue().encode(), path)
    return len(body) - len(kept)


def cut_logs(folder: str, step: int, epoch: int) -> None:
    """Cut the trainer's CSV logs in `folder` back to a checkpoint of `step` (steps done)
    and `epoch` (epochs done): rows logged after it are dropped, so that the resumed run
    logs each step and epoch once."""
    for name, column, first_past in _LOGS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            dropped = _cut_csv(path, column, first_past(step, epoch))
            if dropped:
                log.info("%s: dropped %d row(s) logged after step %d (epoch %d)", path, dropped, step, epoch)
