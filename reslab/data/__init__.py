"""Datasets for training and evaluation: one call, :func:`build_data`, from a :class:`DataConfig`.

Everything callers need is importable from here; the submodules are the implementation.
"""

from reslab.data.batched import BatchDecodeLoader, choose_decode
from reslab.data.build import (
    Data,
    build_data,
    checkpoint_data,
    data_fingerprint,
    fixed_batches,
    has_test_split,
    resolve_paths,
)
from reslab.data.decode import Geometry
from reslab.data.files import image_loader, list_images
from reslab.data.folder import FolderLoader
from reslab.data.loader import (
    Loader,
    Placement,
    Uint8Normalizer,
    default_workers,
    first_batch,
    in_background,
)
from reslab.data.memory import TensorLoader, random_crop_flip
from reslab.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    default_preprocess,
    from_pretrained_cfg,
    imagenet_classes,
    to_pretrained_cfg,
)
from reslab.data.sources import IMG_EXTENSIONS, ImageArrays, find_splits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "BatchDecodeLoader",
    "Data",
    "FolderLoader",
    "Geometry",
    "ImageArrays",
    "Loader",
    "Placement",
    "Preprocess",
    "TensorLoader",
    "Uint8Normalizer",
    "build_data",
    "checkpoint_data",
    "choose_decode",
    "data_fingerprint",
    "default_preprocess",
    "default_workers",
    "find_splits",
    "first_batch",
    "fixed_batches",
    "from_pretrained_cfg",
    "has_test_split",
    "image_loader",
    "imagenet_classes",
    "in_background",
    "list_images",
    "random_crop_flip",
    "resolve_paths",
    "to_pretrained_cfg",
]
