"""Checkpoint files: written atomically (temporary file, fsync, rename, fsync of the
folder) with the permissions of any other output, the last few kept, the newest good one
found again on resume; damaged or mismatched files are named in one-line errors
(`CheckpointError`), and temporaries a killed write left behind are removed."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile

import torch

__all__ = ["CheckpointError", "checkpoint_path", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_newest_good", "mismatch", "remove_temporaries", "save_atomic",
           "save_bytes_atomic", "save_checkpoint", "save_json_atomic"]

log = logging.getLogger(__name__)

PATTERN = re.compile(r"ckpt-(\d+)\.pt$")
#: Temporary files of `_write_atomic` (tempfile.mkstemp: prefix, 8 random characters, suffix).
TEMP_PREFIX = ".tmp-"
TEMP_PATTERN = re.compile(r"^\.tmp-[a-z0-9_]{8}\.(pt|json|csv)$")
#: Suffix given to a damaged checkpoint found on resume (kept for inspection, no longer listed).
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not fit the run that reads it."""


def _umask() -> int:
    """The process umask, read without changing it where /proc says it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: str, write, suffix: str) -> None:
    """Call `write(binary_file)` so that `path` is always either the old file or the
    complete new one, even if the process is killed mid-write. The file gets the mode a
    plain open() would give it (0666 less the umask; mkstemp alone makes it 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def save_bytes_atomic(data: bytes, path: str) -> None:
    """Write `data` to `path`, atomically like `save_atomic`."""
    _write_atomic(path, lambda f: f.write(data), os.path.splitext(path)[1] or ".tmp")


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


def remove_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that a write killed mid-way left in `folder` (see
    `_write_atomic`); returns their paths. Call it where no other process writes."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if TEMP_PATTERN.match(name) and os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed),
                 folder, ", ".join(os.path.basename(p) for p in removed))
    return removed


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split(". This is")[0].split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (full pickle: it holds optimizer
    and RNG state; only load checkpoints you trust). Raises CheckpointError naming the
    file when it is missing, empty, truncated or not a bsnas checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a file")
    damaged = f"checkpoint {path} is damaged (truncated or not a bsnas checkpoint)"
    try:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{damaged}: the file is empty")
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except PermissionError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001  (torch.load fails in many ways on a bad file)
        raise CheckpointError(f"{damaged}: {type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{damaged}: it holds a {type(obj).__name__}"
                              + (" without 'model'" if isinstance(obj, dict) else ""))
    return obj


def load_newest_good(folder: str, map_location="cpu") -> tuple[str, dict] | None:
    """(path, checkpoint) of the newest checkpoint in `folder` that loads, or None when
    there is none. Damaged newer ones are renamed to `<name>.damaged` (so that they are
    neither resumed from nor counted among the kept checkpoints) with a warning naming
    both files; CheckpointError when every one is damaged."""
    found = list_checkpoints(folder)
    damaged = []
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointError as e:
            damaged.append((path, e))
            continue
        for bad, e in damaged:
            aside = bad + DAMAGED_SUFFIX
            try:
                os.replace(bad, aside)
            except OSError:  # another rank moved it first, or a read-only folder
                aside = bad
            log.warning("%s; resuming from %s instead (the damaged file is kept as %s)", e, path, aside)
        return path, ckpt
    if damaged:
        raise CheckpointError(f"no readable checkpoint in {folder}: {damaged[0][1]}"
                              + (f" (and {len(damaged) - 1} older ones)" if len(damaged) > 1 else ""))
    return None


def _describe_space(space: dict) -> str:
    layers = sum(st.get("layers", 0) for st in space.get("stages") or [] if isinstance(st, dict))
    return (f"{space.get('name')!r} ({layers} layers, {space.get('classes')} classes, "
            f"resolution {space.get('resolution')})")


def mismatch(ckpt: dict, path: str, space: dict, model_state: dict) -> str | None:
    """Why checkpoint `ckpt` (from `path`) cannot be loaded into a run whose space is
    `space` (`SearchSpace.to_dict()`) and supernet state is `model_state`: its space, or
    the first parameter that is missing, extra or of another shape; None when it fits."""
    theirs = ckpt.get("space")
    if isinstance(theirs, dict) and theirs != space:
        if theirs.get("name") != space.get("name") or _describe_space(theirs) != _describe_space(space):
            return (f"checkpoint {path} was written for space {_describe_space(theirs)}, "
                    f"this run uses {_describe_space(space)}")
        keys = [k for k in space if theirs.get(k) != space.get(k)] + [k for k in theirs if k not in space]
        return (f"checkpoint {path} was written for another version of space {space.get('name')!r} "
                f"(it differs in {', '.join(map(repr, keys))})")
    given = ckpt.get("model", {})
    for name, t in model_state.items():
        if name not in given:
            return f"checkpoint {path} does not fit this run: it has no {name!r}"
        theirs_t = given[name]
        if tuple(theirs_t.shape) != tuple(t.shape):
            return (f"checkpoint {path} does not fit this run: {name!r} has shape "
                    f"{list(theirs_t.shape)} there, {list(t.shape)} here")
    extra = [n for n in given if n not in model_state]
    if extra:
        return f"checkpoint {path} does not fit this run: it has {extra[0]!r}, which this supernet lacks"
    return None
