"""Training and evaluation loaders over image lists: NVIDIA DALI pipelines when DALI is
importable (GPU decoding with a GPU, CPU-only pipelines otherwise), else a torchvision
fallback with the same augmentations.

Every loader is an iterable of `(images [B, 3, S, S] float32 normalised, labels [B]
int64)` on the target device, with `len()` in batches and `set_epoch(epoch)`. The
torch loader is deterministic: the order and the augmentation of every image depend only
on (seed, epoch, position), so `start_batch` resumes an epoch exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from bsnas.data.folder import ImageList

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random-resized-crop to `size` with area fraction in
    `scale` and aspect ratio in `ratio`, optional horizontal flip; evaluation resizes the
    shorter side to `size / crop_fraction` and takes the centre `size` crop."""
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_fraction: float = 0.875

    @property
    def eval_resize(self) -> int:
        return int(math.ceil(self.size / self.crop_fraction))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001  (missing, or a broken install: fall back)
        return False
    return True


# --------------------------------------------------------------------------- torch


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageList, transform, seed: int):
        self.images, self.transform, self.seed = images, transform, seed
        self.epoch = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.images.files[i]) as im:
            img = im.convert("RGB")
        # Augmentation randomness from (seed, epoch, index) only: identical whatever the
        # worker count, and reproducible when an epoch is resumed part-way.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            x = self.transform(img)
        return x, self.images.labels[i]


class TorchLoader:
    """torchvision transforms + DataLoader; shards by rank like DistributedSampler."""

    backend = "torch"

    def __init__(self, images: ImageList, batch_size: int, augment: Augment, train: bool,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 device: torch.device | str = "cpu", drop_last: bool | None = None,
                 shuffle: bool | None = None):
        from torchvision import transforms as T

        if train:
            ops = [T.RandomResizedCrop(augment.size, scale=augment.scale, ratio=augment.ratio)]
            if augment.flip:
                ops.append(T.RandomHorizontalFlip())
        else:
            ops = [T.Resize(augment.eval_resize), T.CenterCrop(augment.size)]
        transform = T.Compose(ops + [T.ToTensor(), T.Normalize(MEAN, STD)])
        self.dataset = _ListDataset(images, transform, seed)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.device = torch.device(device)
        self.drop_last = train if drop_last is None else drop_last
        self.shuffle = train if shuffle is None else shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.dataset.epoch = epoch

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        if not self.drop_last:  # pad by wrapping so every rank gets the same count
            order += order[: per_rank * self.world_size - n]
        mine = order[self.rank: per_rank * self.world_size: self.world_size]
        if self.drop_last:
            mine = mine[: len(mine) // self.batch_size * self.batch_size]
        return mine

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def iterate(self, start_batch: int = 0):
        """Batches of the current epoch from `start_batch` on."""
        idx = self._indices()[start_batch * self.batch_size:]
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        # Its own generator: creating the iterator must not draw from the global RNG,
        # or a resumed run would see different dropout masks than an uninterrupted one.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(self.seed))
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True),
                   torch.as_tensor(y).to(self.device, non_blocking=True))

    def __iter__(self):
        return self.iterate(0)


# --------------------------------------------------------------------------- DALI


class DaliLoader:
    """A DALI pipeline (file reader -> decoder -> crop/flip/normalise) behind the
    PyTorch iterator. `device_id=None` runs it entirely on the CPU."""

    backend = "dali"

    def __init__(self, images: ImageList, batch_size: int, augment: Augment, train: bool,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 2,
                 device: torch.device | str = "cpu", drop_last: bool | None = None,
                 shuffle: bool | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        device_id = (self.device.index or 0) if gpu else None
        pipe = _dali_pipeline(
            list(images.files), list(images.labels), augment, train, gpu,
            shuffle=train if shuffle is None else shuffle,
            batch_size=batch_size, num_threads=max(1, workers), device_id=device_id,
            seed=seed + 1000 * rank, shard_id=rank, num_shards=world_size)
        pipe.build()
        drop = train if drop_last is None else drop_last
        self.iterator = DALIGenericIterator(
            [pipe], ["images", "labels"], reader_name="reader", auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if drop else LastBatchPolicy.PARTIAL)
        self.batch_size, self.train = batch_size, train
        n = math.ceil(len(images) / world_size)
        self._len = n // batch_size if drop else math.ceil(n / batch_size)

    def set_epoch(self, epoch: int) -> None:
        pass  # the reader reshuffles every epoch from its own seed

    def __len__(self) -> int:
        return self._len

    def iterate(self, start_batch: int = 0):
        for i, out in enumerate(self.iterator):
            if i < start_batch:
                continue
            x, y = out[0]["images"], out[0]["labels"]
            yield x.to(self.device), y.view(-1).long().to(self.device)

    def __iter__(self):
        return self.iterate(0)


def _dali_pipeline(files, labels, augment: Augment, train: bool, gpu: bool, *, shuffle: bool,
                   shard_id: int, num_shards: int, **pipe_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpegs, lab = fn.readers.file(files=files, labels=labels, random_shuffle=shuffle,
                                     shard_id=shard_id, num_shards=num_shards,
                                     name="reader", pad_last_batch=not train)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                   output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(images, size=(augment.size, augment.size),
                                            random_area=list(augment.scale),
                                            random_aspect_ratio=list(augment.ratio))
            mirror = fn.random.coin_flip(probability=0.5) if augment.flip else 0
            crop = None
        else:
            images = fn.resize(images, resize_shorter=augment.eval_resize)
            mirror, crop = 0, (augment.size, augment.size)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=crop, mirror=mirror,
            mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
        return images, lab

    return pipe(**pipe_kwargs)


def make_loader(images: ImageList, batch_size: int, augment: Augment, train: bool,
                backend: str = "auto", **kwargs):
    """A loader over `images`. `backend`: "dali", "torch" or "auto" (DALI when
    importable). The choice is logged."""
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"data.loader must be 'auto', 'dali' or 'torch', got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ValueError("data.loader is 'dali' but nvidia.dali cannot be imported")
    use_dali = backend == "dali" or (backend == "auto" and dali_available())
    cls = DaliLoader if use_dali else TorchLoader
    log.info("data loader: %s (%d images, batch %d, %s)", cls.backend, len(images), batch_size,
             "train" if train else "eval")
    return cls(images, batch_size, augment, train, **kwargs)
