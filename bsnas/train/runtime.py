"""Process set-up shared by supernet training, search and retraining: the distributed
process group (`Dist`, `init_distributed`), the device, seeding and the random-number
state of a checkpoint, the data splits of a run (`build_data`), the optimizer's
parameter groups, the learning-rate schedule and CSV logs."""
from __future__ import annotations

import atexit
import csv
import logging
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bsnas.config import Config
from bsnas.data import (Augment, TensorAugment, load_fashion_mnist, make_loader, prepare_digits,
                        scan_image_folder, split_holdout)
from bsnas.train import host_memory

__all__ = ["DataSplits", "Dist", "append_csv_row", "build_data", "init_distributed", "lr_lambda",
           "param_groups", "pick_device", "rng_state", "seed_everything", "set_rng_state"]

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on
    CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave_process_group() -> None:
    """Destroys the process group this module created, at interpreter exit if nobody did
    before (see bsnas.train.collectives for what a gloo worker left running at shutdown
    can do)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str, d: Dist, keep_freed_memory: bool = False) -> torch.device:
    """The device of config value `name` for this process; on CPU with
    `keep_freed_memory`, the process keeps freed memory for reuse (bsnas.train.host_memory:
    no page faults on every step's activations)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config device is 'cuda' but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    if keep_freed_memory and not host_memory.keep_freed_memory():
        log.info("keep_freed_memory: not applied (not glibc, or set in the environment)")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class DataSplits:
    """Loaders of one run: `train` (augmented, sharded), `calib` (training images for BN
    recalibration), `holdout` (held-out training images, for shrinking and search),
    `val` (never used to choose anything)."""
    train: object
    calib: object
    holdout: object
    val: object
    classes: tuple[str, ...]


def build_data(cfg: Config, space, device, d: Dist) -> DataSplits:
    """The loaders of a run (`DataSplits`) for `cfg.data` and `space`.

    Datasets: `digits` (built in, written once as an image tree), `folder` (an image tree
    at `data.root` with train/ and val/), `fashion_mnist` (the four idx files at
    `data.root`, default /usr/share/datasets/fashion-mnist, held in memory; its t10k
    set is the validation set). `data.train_limit` images of the training set (a
    seeded subset) are used when set; `data.holdout` of them are held out (seeded by
    `seed`) for shrinking and search. BN recalibration uses a fixed seeded subset of
    the rest: `data.calib_images` images, or `calib_batches x batch_size` when
    `data.calib_batches` is set, at most all of them. ValueError when the data does
    not fit the space (classes, channels, resolution) or a split is too large."""
    c = cfg.data
    if c.dataset == "fashion_mnist":
        train = load_fashion_mnist(c.root, "train")
        val = load_fashion_mnist(c.root, "test")
        if space.resolution != train.size[0] or (c.size is not None and c.size != train.size[0]):
            raise ValueError(f"Fashion-MNIST images are {train.size[0]}x{train.size[1]}, but space "
                             f"{space.name!r} has resolution {space.resolution} (data.size: {c.size}); "
                             f"in-memory images are not resized")
        aug = TensorAugment(c.padding, c.flip)
        channels = train.channels
    else:
        root = prepare_digits(c.cache_dir) if c.dataset == "digits" else c.root
        train = scan_image_folder(os.path.join(root, "train"), verify=c.verify,
                                  skip_unreadable=c.skip_unreadable)
        val = scan_image_folder(os.path.join(root, "val"), classes=train.classes, verify=c.verify,
                                skip_unreadable=c.skip_unreadable)
        aug = Augment(c.size or space.resolution, tuple(c.scale), tuple(c.ratio), c.flip,
                      c.crop_fraction)
        channels = 3  # image files are decoded as RGB
    if len(train.classes) != space.classes:
        raise ValueError(f"the data has {len(train.classes)} classes but space "
                         f"{space.name!r} has {space.classes}")
    if channels != space.in_channels:
        raise ValueError(f"the data has {channels} channel(s) per image but space "
                         f"{space.name!r} has in_channels {space.in_channels}")
    if c.train_limit is not None and c.train_limit < len(train):
        train = split_holdout(train, c.train_limit, cfg.seed + 2)[1]
    train, holdout = split_holdout(train, c.holdout, cfg.seed)
    common = dict(backend=c.loader, seed=cfg.seed, workers=c.workers, device=device)
    shard = dict(rank=d.rank, world_size=d.world_size)
    # BN recalibration always uses the same training images (a seeded subset), so a
    # path's fitness is a deterministic function of the weights.
    n_calib = c.calib_images if c.calib_batches is None else c.calib_batches * c.batch_size
    calib = train if n_calib >= len(train) else split_holdout(train, n_calib, cfg.seed + 1)[1]
    if d.main:
        log.info("data %s: %d training images, %d held out, %d for BN recalibration, %d validation",
                 c.dataset, len(train), len(holdout), len(calib), len(val))
    return DataSplits(
        train=make_loader(train, c.batch_size, aug, True, **common, **shard),
        calib=make_loader(calib, c.batch_size, aug, True, shuffle=False, drop_last=False,
                          **common),
        holdout=make_loader(holdout, c.eval_batch_size, aug, False, **common),
        val=make_loader(val, c.eval_batch_size, aug, False, **common),
        classes=train.classes)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution and linear weights only, not on BN or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Linear warm-up to 1, then cosine or linear decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        t = min(max(t, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t
    return factor


def append_csv_row(path: str, row: dict) -> None:
    """Appends `row` to the CSV file at `path`, writing the header first if the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
