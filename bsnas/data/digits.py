"""The built-in dataset: scikit-learn's digits (1,797 real 8x8 handwritten digits),
written once as 32x32 RGB JPEGs in an ImageFolder tree with a fixed train/val split."""
from __future__ import annotations

import os
import random
import shutil
import tempfile

VAL_FRACTION = 0.2
SPLIT_SEED = 0
VERSION = "digits-v1"


def default_cache_dir() -> str:
    return os.environ.get("BSNAS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bsnas"))


def prepare_digits(cache_dir: str | None = None, size: int = 32) -> str:
    """Write the digits as `<cache>/digits-v1/{train,val}/<0..9>/*.jpg` once and return
    that folder. Each class is split 80/20 into train/val by a fixed seed. The tree is
    built in a temporary folder and renamed into place, so an interrupted run never
    leaves a partial dataset behind. Several processes may prepare it at once (the ranks
    of a torchrun job): the first to finish wins, the others keep its tree and drop
    their own (a tree another process completed is never removed: it may be in use)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = os.path.join(cache_dir or default_cache_dir(), VERSION)
    if os.path.isfile(os.path.join(root, ".complete")):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=os.path.dirname(root))
    try:
        digits = load_digits()
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(digits.target):
            by_class.setdefault(int(t), []).append(i)
        rng = random.Random(SPLIT_SEED)
        for label, idx in sorted(by_class.items()):
            rng.shuffle(idx)
            n_val = round(len(idx) * VAL_FRACTION)
            for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
                folder = os.path.join(tmp, split, str(label))
                os.makedirs(folder, exist_ok=True)
                for i in part:
                    pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype("uint8")
                    img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
                    img.convert("RGB").save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.isfile(os.path.join(root, ".complete")):  # another process finished first
            return root
        if os.path.isdir(root):  # a partial tree from an older, interrupted version
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process put its tree in place between the check and the rename.
            if not os.path.isfile(os.path.join(root, ".complete")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root
