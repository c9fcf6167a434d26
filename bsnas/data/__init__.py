"""Data: image folders, the built-in digits dataset, Fashion-MNIST in memory, DALI and
torchvision loaders."""
from bsnas.data.digits import prepare_digits
from bsnas.data.fashion_mnist import load_fashion_mnist, read_idx
from bsnas.data.folder import ImageList, scan_image_folder, split_holdout
from bsnas.data.loaders import (Augment, DaliLoader, DaliTensorLoader, TensorAugment,
                                TensorImages, TensorLoader, TorchLoader, dali_available,
                                make_loader)

__all__ = ["Augment", "DaliLoader", "DaliTensorLoader", "ImageList", "TensorAugment",
           "TensorImages", "TensorLoader", "TorchLoader", "dali_available",
           "load_fashion_mnist", "make_loader", "prepare_digits", "read_idx",
           "scan_image_folder", "split_holdout"]
