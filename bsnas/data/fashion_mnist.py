"""Fashion-MNIST (Zalando Research): 70,000 grey 28x28 images of clothing in 10 classes,
60,000 for training and 10,000 for testing, read from the dataset's four idx files into
uint8 tensors in memory (about 55 MB); no image files are written.

The files, gzipped (`.gz`) or not, in one folder (`data.root`, default
`/usr/share/datasets/fashion-mnist`)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte    (60,000)
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte     (10,000)

Getting them: `apt-get install dataset-fashion-mnist` on Debian/Ubuntu puts the gzipped
files in the default folder; elsewhere, download the four `.gz` files from the official
repository (https://github.com/zalandoresearch/fashion-mnist, folder `data/fashion`)
into any folder and give it as `data.root`.

A file that is missing, not idx (wrong magic number), of the wrong dimensions,
truncated, or whose image and label counts disagree raises a one-line ValueError naming
the file and the problem.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch

from bsnas.data.loaders import TensorImages

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
SIZE = 28
#: Pixel statistics of the 60,000 training images, in [0, 1] units.
MEAN = (0.2860,)
STD = (0.3530,)

_UBYTE = 0x08  # the idx type code of unsigned bytes


def find_idx_file(root: str, name: str) -> str:
    """`root/name`, else `root/name.gz`; ValueError when neither exists."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise ValueError(f"Fashion-MNIST file {os.path.join(root, name)}[.gz] does not exist "
                     f"(apt-get install dataset-fashion-mnist, or set data.root to a folder "
                     f"holding the four idx files)")


def read_idx(path: str, ndim: int) -> torch.Tensor:
    """An idx file of unsigned bytes with `ndim` dimensions (gunzipped when the name
    ends in `.gz`) as a uint8 tensor of the shape its header gives. ValueError, naming
    `path`, on an unreadable or truncated gzip stream, a wrong magic number (expected
    0x000008 then `ndim`), or data shorter or longer than the header's shape."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except EOFError:
        raise ValueError(f"{path}: truncated gzip stream") from None
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if len(data) < 4:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the idx magic number")
    magic = struct.unpack(">I", data[:4])[0]
    want = (_UBYTE << 8) | ndim
    if magic >> 8 != _UBYTE:
        raise ValueError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{want:08x} "
                         f"(idx, unsigned bytes, {ndim} dimensions)")
    if magic & 0xFF != ndim:
        raise ValueError(f"{path}: wrong dims: {magic & 0xFF} dimensions (magic number "
                         f"0x{magic:08x}), expected {ndim} (0x{want:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the "
                         f"{header}-byte idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    need, have = math.prod(shape), len(data) - header
    if have != need:
        what = "truncated" if have < need else "too long"
        raise ValueError(f"{path}: {what}: the header's shape {' x '.join(map(str, shape))} "
                         f"needs {need} bytes of data, the file has {have}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(array.copy())


def load_fashion_mnist(root: str | None = None, split: str = "train") -> TensorImages:
    """The `split` ("train": 60,000 images, or "test": 10,000) of Fashion-MNIST under
    `root` (default `DEFAULT_ROOT`) as `TensorImages`: images [N, 1, 28, 28] uint8,
    labels [N] int64 in [0, 10), the class names and the training set's mean/std.
    ValueError on a missing or bad file (see the module doc)."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {list(FILES)}, got {split!r}")
    root = DEFAULT_ROOT if root is None else root
    image_path, label_path = (find_idx_file(root, name) for name in FILES[split])
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    if tuple(images.shape[1:]) != (SIZE, SIZE):
        raise ValueError(f"{image_path}: wrong dims: images are {images.shape[1]}x"
                         f"{images.shape[2]}, expected {SIZE}x{SIZE}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} holds {images.shape[0]} images but {label_path} "
                         f"holds {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} is out of range "
                         f"[0, {len(CLASSES)})")
    return TensorImages(images.unsqueeze(1), labels.long(), CLASSES, MEAN, STD)
