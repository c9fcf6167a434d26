"""Data: image folders, the built-in digits dataset, DALI and torchvision loaders."""
from bsnas.data.digits import prepare_digits
from bsnas.data.folder import ImageList, scan_image_folder, split_holdout
from bsnas.data.loaders import Augment, DaliLoader, TorchLoader, dali_available, make_loader

__all__ = ["Augment", "DaliLoader", "ImageList", "TorchLoader", "dali_available",
           "make_loader", "prepare_digits", "scan_image_folder", "split_holdout"]
