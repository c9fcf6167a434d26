"""Checkpoint files: written atomically (temporary file, fsync, rename, fsync of the
folder), the last few kept, the newest found again on resume."""
from __future__ import annotations

import glob
import json
import os
import re
import tempfile

import torch

PATTERN = re.compile(r"ckpt-(\d+)\.pt$")


def _write_atomic(path: str, write, suffix: str) -> None:
    """Call `write(binary_file)` so that `path` is always either the old file or the
    complete new one, even if the process is killed mid-write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    """torch.save `obj` to `path` so that `path` is always either the old file or the
    complete new one, even if the process is killed mid-write."""
    _write_atomic(path, lambda f: torch.save(obj, f), ".pt")


def save_json_atomic(obj, path: str) -> None:
    """Write `obj` as indented JSON to `path`, atomically like `save_atomic` (logs and
    resumable state that other processes may read while it is rewritten)."""
    text = json.dumps(obj, indent=1) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()), ".json")


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"ckpt-{step:09d}.pt")


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoint files in `folder`, oldest first (by step)."""
    found = [p for p in glob.glob(os.path.join(folder, "ckpt-*.pt")) if PATTERN.search(p)]
    return sorted(found, key=lambda p: int(PATTERN.search(p).group(1)))


def latest_checkpoint(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(obj, folder: str, step: int, keep: int) -> str:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    path = checkpoint_path(folder, step)
    save_atomic(obj, path)
    for old in list_checkpoints(folder)[:-keep]:
        os.unlink(old)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (full pickle: it holds optimizer
    and RNG state; only load checkpoints you trust)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    obj = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{path!r} is not a bsnas checkpoint")
    return obj
