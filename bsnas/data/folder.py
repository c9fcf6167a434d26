"""Image folders in the ImageNet layout (`<root>/<class>/<image>`): scanning, checks
that fail before training starts (every image decoded), and the fixed held-out split of
the training set."""
from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageList:
    """Files with integer labels; `classes[label]` is the class folder name.
    `skip_unreadable`: loaders leave out (and log) an image that cannot be decoded
    instead of stopping with an error naming it."""
    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    skip_unreadable: bool = False

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> "ImageList":
        return ImageList(tuple(self.files[i] for i in indices),
                         tuple(self.labels[i] for i in indices), self.classes, self.skip_unreadable)


def unreadable(path: str) -> str | None:
    """Why the image file at `path` cannot be used (one line), or None: it is decoded
    fully, so a file cut short after a valid header is found too."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return "empty image"
            im.load()  # the whole image, not only the header
    except Exception as e:  # noqa: BLE001  (any decoder error means unreadable)
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def scan_image_folder(root: str, classes: tuple[str, ...] | None = None,
                      verify: bool = True, skip_unreadable: bool = False) -> ImageList:
    """List the images under `root/<class>/`, labelled by the sorted class names (or by
    the given `classes`, e.g. the training set's, for a validation folder).

    With `verify`, every image is decoded (in threads) before training starts.
    Unreadable images raise ValueError naming them, or with `skip_unreadable` are left
    out with a logged count (the loaders then also skip, rather than stop on, an image
    that fails later). Raises ValueError when the folder is missing, holds no class
    folders, a class folder holds no images, or a class is not among `classes`.
    """
    if not os.path.isdir(root):
        raise ValueError(f"data folder {root!r} does not exist")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise ValueError(f"data folder {root!r} has no class sub-folders")
    if classes is None:
        classes = tuple(found)
    else:
        missing = [c for c in found if c not in classes]
        if missing:
            raise ValueError(f"classes {missing} of {root!r} are missing from the training set")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        folder = os.path.join(root, c)
        images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise ValueError(f"class folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [os.path.join(folder, f) for f in images]
        labels += [index[c]] * len(images)
    if verify:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(unreadable, files, chunksize=64))
        bad = [(f, why) for f, why in zip(files, reasons) if why is not None]
        if bad:
            shown = "; ".join(f"{f} ({why})" for f, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
            if not skip_unreadable:
                raise ValueError(f"{len(bad)} unreadable image(s) under {root!r}: {shown} "
                                 f"(data.skip_unreadable=true leaves them out)")
            keep = [i for i, why in enumerate(reasons) if why is None]
            if not keep:
                raise ValueError(f"every image under {root!r} is unreadable: {shown}")
            log.warning("data.skip_unreadable: left out %d unreadable image(s) of %d under %s: %s",
                        len(bad), len(files), root, shown)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return ImageList(tuple(files), tuple(labels), tuple(classes), skip_unreadable)


def split_holdout(images: ImageList, holdout: int, seed: int) -> tuple[ImageList, ImageList]:
    """Split off `holdout` images of the training set, chosen by `seed`, for shrinking
    and search (the validation set is never used to choose anything). Returns
    (train, holdout), each in the original order. Works on any image set with `len()`
    and `subset(indices)`: an `ImageList` or in-memory `TensorImages`."""
    if not 0 <= holdout < len(images):
        raise ValueError(f"data.holdout must be in [0, {len(images)}) for {len(images)} "
                         f"training images, got {holdout}")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:holdout])
    keep = sorted(order[holdout:])
    return images.subset(keep), images.subset(held)
