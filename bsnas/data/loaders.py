"""Training and evaluation loaders over image lists: NVIDIA DALI pipelines when DALI is
importable (GPU decoding with a GPU, CPU-only pipelines otherwise), else a torchvision
fallback with the same augmentations. In-memory images (`TensorImages`, e.g.
Fashion-MNIST) are augmented with tensor ops (pad-and-crop, flip), or by a DALI
pipeline fed from memory through `external_source`.

Every loader is an iterable of `(images [B, C, S, S] float32 normalised, labels [B]
int64)` on the target device, with `len()` in batches and `set_epoch(epoch)`. The
torch and in-memory loaders are deterministic: the order and the augmentation of every
image depend only on (seed, epoch, position), so `start_batch` resumes an epoch exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from bsnas.data.folder import ImageList, unreadable

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


def epoch_indices(n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                  epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The dataset indices this rank reads in `epoch`, in order: a permutation of
    `range(n)` drawn from (seed, epoch) when `shuffle`, then every `world_size`-th from
    `rank`. With `drop_last` each rank gets `n // world_size` cut to whole batches; without,
    the order is padded by wrapping so every rank gets `ceil(n / world_size)`."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    if not drop_last:  # pad by wrapping so every rank gets the same count
        order += order[: per_rank * world_size - n]
    mine = order[rank: per_rank * world_size: world_size]
    if drop_last:
        mine = mine[: len(mine) // batch_size * batch_size]
    return mine


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageList, transform, seed: int):
        self.images, self.transform, self.seed = images, transform, seed
        self.epoch = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        """(image tensor, label), or (None, (path, why)) when the file cannot be decoded:
        the main process names it (an exception raised in a worker would arrive wrapped
        in a traceback)."""
        from PIL import Image
        path = self.images.files[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001  (any decoder error means unreadable)
            return None, (path, unreadable(path) or "cannot be decoded")
        # Augmentation randomness from (seed, epoch, index) only: identical whatever the
        # worker count, and reproducible when an epoch is resumed part-way.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            x = self.transform(img)
        return x, self.images.labels[i]


def _collate(items):
    """(images, labels, [(path, why) of the unreadable items]); images and labels are
    None when no item of the batch was readable."""
    good = [it for it in items if it[0] is not None]
    bad = [it[1] for it in items if it[0] is None]
    if not good:
        return None, None, bad
    x, y = torch.utils.data.default_collate(good)
    return x, y, bad


class TorchLoader:
    """torchvision transforms + DataLoader; shards by rank like DistributedSampler. An
    image that cannot be decoded stops iteration with a ValueError naming the file, or,
    when the image list has `skip_unreadable`, is left out of its batch (logged)."""

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
        self.skipped = 0  # unreadable images left out so far (skip_unreadable)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.dataset.epoch = epoch

    def _indices(self) -> list[int]:
        return epoch_indices(len(self.dataset), self.batch_size, shuffle=self.shuffle,
                             drop_last=self.drop_last, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def iterate(self, start_batch: int = 0):
        """Batches of the current epoch from `start_batch` on."""
        idx = self._indices()[start_batch * self.batch_size:]
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        # Its own generator: creating the iterator must not draw from the global RNG,
        # or a resumed run would see different dropout masks than an uninterrupted one.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             num_workers=self.workers, collate_fn=_collate,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(self.seed))
        for x, y, bad in loader:
            if bad:
                x, y = self._unreadable(x, y, bad)
            yield (x.to(self.device, non_blocking=True),
                   torch.as_tensor(y).to(self.device, non_blocking=True))

    def _unreadable(self, x, y, bad: list[tuple[str, str]]):
        """A batch with unreadable images: ValueError naming the first one, or with the
        image list's `skip_unreadable` the batch without them (logged, counted in
        `self.skipped`)."""
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        if not self.dataset.images.skip_unreadable:
            path, why = bad[0]
            raise ValueError(f"image {path} cannot be decoded ({why}); data.verify=true finds such "
                             f"files before training, data.skip_unreadable=true leaves them out")
        if x is None:
            raise ValueError(f"every image of a batch is unreadable: {shown}")
        self.skipped += len(bad)
        log.warning("data.skip_unreadable: left %d unreadable image(s) out of a batch (%d so far): %s",
                    len(bad), self.skipped, shown)
        return x, y

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


# --------------------------------------------------------------------------- in memory


@dataclass(frozen=True, eq=False)
class TensorImages:
    """Images held in memory: `images` [N, C, H, W] uint8, `labels` [N] int64 in
    [0, len(classes)), `classes[label]` the class name, `mean`/`std` the per-channel
    normalisation statistics in [0, 1] pixel units (C values each)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"images must be a [N, C, H, W] uint8 tensor, got {x.dtype} "
                             f"{list(x.shape)}")
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(f"labels must be an int64 tensor of shape [{x.shape[0]}], got "
                             f"{y.dtype} {list(y.shape)}")
        if len(self.mean) != x.shape[1] or len(self.std) != x.shape[1] or min(self.std) <= 0:
            raise ValueError(f"mean and std need {x.shape[1]} values (std > 0), got "
                             f"{list(self.mean)} and {list(self.std)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return tuple(self.images.shape[2:])

    def subset(self, indices) -> "TensorImages":
        """The images at `indices` (a copy), in that order."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return TensorImages(self.images.index_select(0, idx), self.labels.index_select(0, idx),
                            self.classes, self.mean, self.std)


@dataclass(frozen=True)
class TensorAugment:
    """Augmentation of in-memory images. Training: zero-pad every side by `padding`
    pixels, take a random crop of the original size, flip it horizontally with
    probability 1/2 when `flip`; evaluation takes the images as they are. Both then
    normalise to `(x / 255 - mean) / std` (the images' statistics)."""
    padding: int = 2
    flip: bool = True

    def __post_init__(self):
        if not isinstance(self.padding, int) or isinstance(self.padding, bool) or self.padding < 0:
            raise ValueError(f"data.padding must be an integer >= 0, got {self.padding!r}")


_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def augment_params(seed: int, epoch: int, indices, augment: TensorAugment
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random choices of the training augmentation for dataset `indices` (B ints) in
    `epoch`: crop offsets `dy`, `dx` in the padded image (each in [0, 2 * padding]) and
    `flip` (0 or 1), three int32 arrays of shape [B]. A function of (seed, epoch, index)
    only, so any batching, worker count or resume point sees the same choices."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & _MASK64], np.uint64) + _GOLDEN)
        key = _mix64(key ^ np.array([epoch & _MASK64], np.uint64))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        z = _mix64(key + (idx + np.uint64(1)) * _GOLDEN)
    span = np.uint64(2 * augment.padding + 1)
    dy = ((z & np.uint64(0xFFFF)) % span).astype(np.int32)
    dx = (((z >> np.uint64(16)) & np.uint64(0xFFFF)) % span).astype(np.int32)
    flip = ((z >> np.uint64(32)) & np.uint64(1)).astype(np.int32) if augment.flip \
        else np.zeros(len(idx), np.int32)
    return dy, dx, flip


def pad_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  padding: int) -> torch.Tensor:
    """Per image of `x` [B, C, H, W] (any dtype): zero-pad by `padding`, crop the H x W
    window whose top-left corner is (`dy[b]`, `dx[b]`) in the padded image, mirror its
    columns where `flip[b]` is 1. `dy`, `dx`, `flip`: [B] integer tensors on x's device. Returns
    [B, C, H, W], contiguous."""
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = x.new_zeros(b, c, hp, wp)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    dev = x.device
    dy, dx, flip = dy.to(dev, torch.int64), dx.to(dev, torch.int64), flip.to(dev, torch.bool)
    rows = dy[:, None] + torch.arange(h, device=dev)                      # [B, H]
    ahead = torch.arange(w, device=dev)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ahead, ahead)  # [B, W]
    # One gather over the flattened padded planes (much faster than 4-D fancy indexing).
    where = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, hp * wp).gather(2, where).view(b, c, h, w)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 `(x / 255 - mean) / std`, per channel."""
    m = torch.tensor([255.0 * v for v in mean], device=x.device).view(1, -1, 1, 1)
    s = torch.tensor([255.0 * v for v in std], device=x.device).view(1, -1, 1, 1)
    return (x.float() - m) / s


class TensorLoader:
    """Batches of in-memory images (`TensorImages`), augmented with tensor ops on the
    target device; no worker processes. Order, sharding and augmentation follow the
    torch loader's rules: a function of (seed, epoch, position), so `start_batch`
    resumes an epoch exactly."""

    backend = "torch"

    def __init__(self, images: TensorImages, batch_size: int, augment: TensorAugment,
                 train: bool, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, device: torch.device | str = "cpu",
                 drop_last: bool | None = None, shuffle: bool | None = None):
        del workers  # the batches are tensor ops in this process
        self.images, self.augment = images, augment
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.drop_last = train if drop_last is None else drop_last
        self.shuffle = train if shuffle is None else shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        return epoch_indices(len(self.images), self.batch_size, shuffle=self.shuffle,
                             drop_last=self.drop_last, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size)

    def _batches(self, start_batch: int) -> list[list[int]]:
        idx = self._indices()[start_batch * self.batch_size:]
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def iterate(self, start_batch: int = 0):
        """Batches `(images [B, C, H, W] float32, labels [B] int64)` of the current
        epoch from `start_batch` on."""
        cuda = self.device.type == "cuda"
        for batch in self._batches(start_batch):
            idx = torch.tensor(batch, dtype=torch.int64)
            x = self.images.images.index_select(0, idx)
            y = self.images.labels.index_select(0, idx)
            if cuda:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.train:
                dy, dx, flip = (torch.from_numpy(a) for a in
                                augment_params(self.seed, self.epoch, batch, self.augment))
                x = pad_crop_flip(x, dy, dx, flip, self.augment.padding)
            yield normalise(x, self.images.mean, self.images.std), y

    def __iter__(self):
        return self.iterate(0)


class DaliTensorLoader(TensorLoader):
    """In-memory images through a DALI pipeline fed by `external_source`: the images of
    each batch (and, in training, the crop anchors and flips of `augment_params`) go in,
    DALI pads, crops, mirrors and normalises (on the GPU with a CUDA device, else on the
    CPU). Order, sharding, augmentation and resume are exactly those of `TensorLoader`;
    labels come straight from memory."""

    backend = "dali"

    def __init__(self, images: TensorImages, batch_size: int, augment: TensorAugment,
                 train: bool, *, workers: int = 2, **kwargs):
        super().__init__(images, batch_size, augment, train, **kwargs)
        gpu = self.device.type == "cuda"
        self._hwc = images.images.permute(0, 2, 3, 1).numpy()  # a view: DALI's layout
        self._pipe = _dali_tensor_pipeline(
            images.size, images.mean, images.std, train, gpu, batch_size=batch_size,
            num_threads=max(1, workers), device_id=(self.device.index or 0) if gpu else None,
            seed=self.seed)
        self._pipe.build()

    def iterate(self, start_batch: int = 0):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        for batch in self._batches(start_batch):
            self._pipe.feed_input("images", np.ascontiguousarray(self._hwc[batch]))
            if self.train:
                dy, dx, flip = augment_params(self.seed, self.epoch, batch, self.augment)
                p = self.augment.padding
                self._pipe.feed_input("anchor", np.stack([dy - p, dx - p], axis=1))
                self._pipe.feed_input("mirror", flip)
            out = self._pipe.run()[0].as_tensor()
            x = torch.empty(out.shape(), dtype=torch.float32, device=self.device)
            # A blocking copy: the next run() may reuse DALI's output buffer.
            feed_ndarray(out, x, cuda_stream=None)
            y = self.images.labels[torch.tensor(batch, dtype=torch.int64)]
            yield x, y.to(self.device, non_blocking=True)


def _dali_tensor_pipeline(size, mean, std, train: bool, gpu: bool, **pipe_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    # Fed one batch at a time with feed_input and run synchronously: each run() returns
    # the batch just fed, so an epoch can start at any batch.
    @pipeline_def(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def pipe():
        images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
        if gpu:
            images = images.gpu()
        mirror = 0
        if train:
            # Out-of-bounds rows and columns read as zeros: pad-and-crop in one slice.
            anchor = fn.external_source(name="anchor", dtype=types.INT32)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            images = fn.slice(images, start=anchor, shape=list(size), axis_names="HW",
                              out_of_bounds_policy="pad", fill_values=0)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mirror=mirror, mean=[255 * m for m in mean],
                                        std=[255 * s for s in std])

    return pipe(**pipe_kwargs)


def make_loader(images: ImageList | TensorImages, batch_size: int,
                augment: Augment | TensorAugment, train: bool, backend: str = "auto", **kwargs):
    """A loader over `images`: an `ImageList` (files, with an `Augment`) or
    `TensorImages` (in memory, with a `TensorAugment`). `backend`: "dali", "torch" or
    "auto": DALI when importable for files; for in-memory images "auto" is the tensor
    loader (nothing to decode, and no pipeline to feed). The choice is logged."""
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"data.loader must be 'auto', 'dali' or 'torch', got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ValueError("data.loader is 'dali' but nvidia.dali cannot be imported")
    in_memory = isinstance(images, TensorImages)
    wanted = TensorAugment if in_memory else Augment
    if not isinstance(augment, wanted):
        raise ValueError(f"{type(images).__name__} needs a {wanted.__name__} augmentation, "
                         f"got {type(augment).__name__}")
    if in_memory:
        cls = DaliTensorLoader if backend == "dali" else TensorLoader
    else:
        use_dali = backend == "dali" or (backend == "auto" and dali_available())
        cls = DaliLoader if use_dali else TorchLoader
    log.info("data loader: %s (%d images, batch %d, %s)", cls.backend, len(images), batch_size,
             "train" if train else "eval")
    return cls(images, batch_size, augment, train, **kwargs)
