"""Image folders in the ImageNet layout (`<root>/<class>/<image>`): scanning, checks
that fail before training starts, and the fixed held-out split of the training set."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageList:
    """Files with integer labels; `classes[label]` is the class folder name."""
    files: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> "ImageList":
        return ImageList(tuple(self.files[i] for i in indices),
                         tuple(self.labels[i] for i in indices), self.classes)


def _unreadable(path: str) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as im:  # parses the header only
            w, h = im.size
            if w < 1 or h < 1:
                return "empty image"
    except Exception as e:  # noqa: BLE001  (any decoder error means unreadable)
        return f"{type(e).__name__}: {e}"
    return None


def scan_image_folder(root: str, classes: tuple[str, ...] | None = None,
                      verify: bool = True) -> ImageList:
    """List the images under `root/<class>/`, labelled by the sorted class names (or by
    the given `classes`, e.g. the training set's, for a validation folder).

    Raises ValueError when the folder is missing, holds no class folders, a class
    folder holds no images, a class is not among `classes`, or (with `verify`) an image
    header cannot be read.
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
        bad = [(f, why) for f in files if (why := _unreadable(f)) is not None]
        if bad:
            shown = "; ".join(f"{f} ({why})" for f, why in bad[:5])
            raise ValueError(f"{len(bad)} unreadable image(s) under {root!r}: {shown}")
    return ImageList(tuple(files), tuple(labels), tuple(classes))


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
