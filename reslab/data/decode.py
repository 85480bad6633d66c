"""How an image file becomes a model-sized uint8 image: the decoders and the geometry, on any device.

Both large-image paths use what is here. The CPU path (:class:`~reslab.data.folder.FolderLoader`)
decodes and transforms one file at a time in DataLoader workers; the batched path
(:class:`~reslab.data.batched.BatchDecodeLoader`) decodes a whole batch of JPEGs in one call on the
GPU (nvjpeg) and applies the same :class:`Geometry` there. The geometry is torchvision's own tensor
transforms (``resized_crop``/``resize``/``center_crop`` with antialiasing, uint8 in, uint8 out),
with the random crops and flips drawn exactly as torchvision's ``RandomResizedCrop`` and
``RandomHorizontalFlip`` draw them after ``torch.manual_seed(sample seed)``, so every path sees
the same boxes and a resumed run the same crops. What differs between the paths is the JPEG
decoder (libjpeg-turbo on CPUs, nvjpeg on GPUs; README, "Large JPEG datasets", gives the measured
pixel differences).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from dataclasses import dataclass

import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

JPEG_MAGIC = b"\xff\xd8\xff"
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
DRAFT_FACTOR = 2  # decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop is at least this much larger


def is_jpeg(data: bytes | torch.Tensor) -> bool:
    head = bytes(data[:3]) if isinstance(data, bytes) else bytes(data[:3].tolist())
    return head == JPEG_MAGIC


def _mode(channels: int) -> ImageReadMode:
    return ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB


def _quietly(fn, *args, **kwargs):
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which has no batched
    # GPU JPEG decoding yet: this is the one place to change when torchvision drops them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


class UnreadableImage(ValueError):
    """A file that is not an image any decoder here can read."""


def decode_bytes(data: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """One file's bytes (a uint8 tensor) as a uint8 (C, H, W) image on the CPU: JPEGs by
    libjpeg-turbo through torchvision (1.5x faster than through PIL here), every other format by
    PIL. Raises :class:`UnreadableImage` for a file that is not a readable image."""
    if is_jpeg(data):
        try:
            return _quietly(torchvision.io.decode_jpeg, data, mode=_mode(channels))
        except RuntimeError as e:
            raise UnreadableImage(f"not a readable JPEG ({_first_line(e)})") from None
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            img = TF.pil_to_tensor(im.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated and non-image files
        known = "" if isinstance(e, UnidentifiedImageError) else f" ({_first_line(e)})"
        raise UnreadableImage(f"not an image file PIL can read{known}") from None
    return img


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\w+, \S+:\d+, ", "", line)  # torchvision's "function, file.cpp:171, " prefix


def describe_failure(path: str, e: BaseException) -> str:
    """A skip message naming the file and what is wrong with it."""
    if isinstance(e, UnreadableImage):
        return f"{path}: {e}"
    return f"{path}: {type(e).__name__}: {_first_line(e)}"


def decode_jpegs(datas: list[torch.Tensor], device: torch.device, channels: int = 3) -> list[torch.Tensor]:
    """Several JPEGs decoded in one call on ``device`` (nvjpeg's batched decoder on CUDA)."""
    return _quietly(torchvision.io.decode_jpeg, datas, mode=_mode(channels), device=device)


def random_resized_crop(height: int, width: int, seed: int) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, mirror) as torchvision's RandomResizedCrop and
    RandomHorizontalFlip draw them after ``torch.manual_seed(seed)``, without touching the global RNG."""
    g = torch.Generator().manual_seed(seed)
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*SCALE, generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:  # torchvision's fallback: a central crop of the nearest allowed aspect ratio
        ratio = width / height
        w, h = (width, round(width / RATIO[0])) if ratio < RATIO[0] else (width, height)
        if ratio > RATIO[1]:
            h, w = height, round(height * RATIO[1])
        top, left = (height - h) // 2, (width - w) // 2
    mirror = not bool(torch.rand(1, generator=g) >= 0.5)
    return top, left, h, w, mirror


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels go, as torchvision's transforms put them.

    ``train``: a random-resized crop to ``size`` and a random mirror, drawn from the sample's seed.
    Otherwise, with ``resize``: the shorter side resized to ``resize``, then the central ``size``
    crop (ImageNet evaluation); without: the whole image resized to ``size`` (small-image models).
    """

    size: tuple[int, int]
    resize: int | None = None
    train: bool = False
    interpolation: str = "bilinear"

    def __call__(self, img: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """A uint8 (C, H, W) image on any device -> uint8 (C, *size) on the same device."""
        if self.train:
            return self.crop(img, random_resized_crop(*img.shape[-2:], seed))
        mode = InterpolationMode(self.interpolation)
        if self.resize is None:
            return TF.resize(img, list(self.size), interpolation=mode, antialias=True)
        resized = TF.resize(img, [self.resize], interpolation=mode, antialias=True)
        return TF.center_crop(resized, list(self.size))

    def crop(self, img: torch.Tensor, box: tuple[int, int, int, int, bool]) -> torch.Tensor:
        """The training crop ``box`` (top, left, height, width, mirror) of ``img``, resized to ``size``."""
        top, left, h, w, mirror = box
        mode = InterpolationMode(self.interpolation)
        out = TF.resized_crop(img, top, left, h, w, list(self.size), interpolation=mode, antialias=True)
        return out.flip(-1) if mirror else out

    def draft_size(
        self, height: int, width: int, box: tuple[int, int, int, int, bool]
    ) -> tuple[int, int] | None:
        """For a training crop ``box`` at least :data:`DRAFT_FACTOR` times the output on both axes:
        the smallest (width, height) the JPEG decoder may scale the whole image down to (its DCT
        scaling halves, quarters or eighths it) while the crop keeps at least ``size`` pixels.
        None: decode at full size."""
        _, _, h, w, _ = box
        if not self.train or h < DRAFT_FACTOR * self.size[0] or w < DRAFT_FACTOR * self.size[1]:
            return None
        return math.ceil(width * self.size[1] / w), math.ceil(height * self.size[0] / h)


def load_image(
    data: bytes, geometry: Geometry, seed: int, channels: int = 3, draft: bool = False
) -> torch.Tensor:
    """A file's bytes -> a uint8 (C, *size) image on the CPU: the CPU path's whole per-image work.

    ``draft``: decode a JPEG at reduced scale when the training crop allows it
    (:meth:`Geometry.draft_size`; fewer pixels to decode and to resize, slightly other pixels than
    a full decode). The crop box is the one the full-size image gets, scaled to the decoded size.
    """
    if draft and geometry.train and is_jpeg(data):
        with contextlib.suppress(OSError, ValueError, SyntaxError):  # unreadable: the full decode says why
            drafted = _draft_crop(data, geometry, seed, channels)
            if drafted is not None:
                return drafted
    return geometry(decode_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), channels), seed)


def _draft_crop(data: bytes, geometry: Geometry, seed: int, channels: int) -> torch.Tensor | None:
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        box = random_resized_crop(height, width, seed)
        target = geometry.draft_size(height, width, box)
        if target is None:
            return None
        im.draft(mode, target)
        img = TF.pil_to_tensor(im.convert(mode))
    top, left, h, w, mirror = box
    sy, sx = img.shape[1] / height, img.shape[2] / width
    top, left = int(top * sy), int(left * sx)
    h = min(max(1, round(h * sy)), img.shape[1] - top)
    w = min(max(1, round(w * sx)), img.shape[2] - left)
    return geometry.crop(img, (top, left, h, w, mirror))
