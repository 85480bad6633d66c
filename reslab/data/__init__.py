"""Datasets for training and evaluation: one call, :func:`build_data`, from a :class:`DataConfig`.

Everything callers need is importable from here; the submodules are the implementation.
"""

from reslab.data.build import Data, build_data, checkpoint_data, fixed_batches, has_test_split
from reslab.data.decode import BatchDecodeLoader
from reslab.data.files import image_loader, list_images
from reslab.data.folder import FolderLoader
from reslab.data.loader import Loader, Placement, Uint8Normalizer
from reslab.data.memory import TensorLoader, random_crop_flip
from reslab.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    default_preprocess,
    eval_transform,
    imagenet_transforms,
)
from reslab.data.sources import IMG_EXTENSIONS, ImageArrays, find_splits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "BatchDecodeLoader",
    "Data",
    "FolderLoader",
    "ImageArrays",
    "Loader",
    "Placement",
    "Preprocess",
    "TensorLoader",
    "Uint8Normalizer",
    "build_data",
    "checkpoint_data",
    "default_preprocess",
    "eval_transform",
    "find_splits",
    "fixed_batches",
    "has_test_split",
    "image_loader",
    "imagenet_transforms",
    "list_images",
    "random_crop_flip",
]
