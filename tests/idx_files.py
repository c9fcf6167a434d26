"""Small idx files (the MNIST / Fashion-MNIST format) that tests write themselves, so the
suite never needs the real data set."""
from __future__ import annotations

import gzip
import struct

import numpy as np


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An idx file of unsigned bytes holding `array` (magic 0x000008<ndim> unless given)."""
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + data


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """Writes `array` as an idx file at `path` (`path` + ".gz", gzipped, when `gz`)."""
    data = idx_bytes(array)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
