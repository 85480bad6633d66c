"""Image files decoded and transformed a batch at a time on the device: the GPU image pipeline.

DataLoader workers only read file bytes. The main process decodes a whole batch of JPEGs in one
call (nvjpeg on CUDA, libjpeg-turbo on a CPU), then crops, resizes and flips every image of the
batch with two batched matrix products: resizing an axis with antialiased bilinear interpolation
is a linear map, whose (output x input) matrix holds, for each output pixel, the triangle-filter
weights PIL and torchvision use (:func:`resize_matrix`). A crop is a choice of input range, a flip
a reversal of the output rows, so one matrix per image and axis does all three. The result is
rounded to uint8 like the CPU path's and normalised on the device in the model's memory format.

Crops and flips are drawn exactly as the CPU path draws them (torchvision's RandomResizedCrop and
RandomHorizontalFlip, replayed with each sample's seed), so both paths see the same boxes. Pixels
differ slightly: PIL resizes in fixed point and its JPEG decoder is not nvjpeg (README, "GPU image
pipeline", gives the measured differences).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode

from reslab.data.folder import FileLoader
from reslab.data.loader import Placement
from reslab.errors import ReslabError

JPEG_MAGIC = b"\xff\xd8\xff"
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults, as the CPU path's
CHUNK_PIXELS = 2**26  # pad at most this many input values per matrix product (memory bound)


def geometry_problem(resize: int | None, interpolation: str) -> str | None:
    """Why the batched path cannot reproduce a preprocessing (None: it can)."""
    if resize is None:
        return "this model resizes whole images (small-image preprocessing)"
    return (
        None
        if interpolation == "bilinear"
        else f"this preprocessing resizes with {interpolation} interpolation"
    )


def use_batch_decoding(choice: str, device: torch.device, geometry: str | None = None) -> bool:
    """Whether ``data.decode`` (``auto``/``cpu``/``gpu``) means decoding batches on the device.
    ``auto``: on CUDA devices whose JPEG decoder works; ``gpu`` without CUDA runs the same batched
    path on the CPU (said once). ``geometry``: why the batched path cannot do this preprocessing
    (it resizes bilinearly, shorter side then center crop), if it cannot."""
    if choice == "cpu":
        return False
    if geometry is not None:
        if choice == "gpu":
            warnings.warn(f"decode=gpu: {geometry}; decoding with PIL instead", stacklevel=2)
        return False
    if choice == "auto":
        return device.type == "cuda" and decoder_available(device)
    if device.type != "cuda":
        warnings.warn("decode=gpu without a CUDA device: batches are decoded on the CPU", stacklevel=2)
    elif not decoder_available(device):
        raise ReslabError("decode=gpu: this torchvision cannot decode JPEGs on CUDA (nvjpeg); use decode=cpu")
    return True


def decoder_available(device: torch.device) -> bool:
    """Whether JPEGs can be decoded on ``device`` (nvjpeg on CUDA; always on a CPU)."""
    if device.type != "cuda":
        return True
    try:
        tiny = torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        _decode_jpegs([tiny], device, ImageReadMode.RGB)
        return True
    except (RuntimeError, AttributeError):
        return False


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device, mode: ImageReadMode) -> list[torch.Tensor]:
    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which has no batched
    # GPU JPEG decoding yet: this is the one call to change when torchvision drops them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torchvision.io.decode_jpeg(datas, mode=mode, device=device)


def decode_images(
    datas: list[torch.Tensor], paths: list[str], device: torch.device, channels: int = 3
) -> list[torch.Tensor | str]:
    """Each file's bytes as a uint8 (C, H, W) image on ``device``, or a skip message naming the file.

    JPEGs are decoded in one batched call; other formats (PNG, ...) and any JPEG the batched call
    refuses are decoded one by one on the CPU, so one broken file does not cost the batch.
    """
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | str | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if bytes(d[:3].tolist()) == JPEG_MAGIC]
    if jpegs:
        try:
            for i, img in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device, mode), strict=True):
                out[i] = img
        except RuntimeError:  # a corrupt JPEG in the batch: find it below, one file at a time
            pass
    for i, d in enumerate(datas):
        if out[i] is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    out[i] = torchvision.io.decode_image(d, mode=mode).to(device, non_blocking=True)
            except RuntimeError as e:
                out[i] = f"{paths[i]}: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
    return out


def resize_matrix(
    in_start: torch.Tensor,
    in_len: torch.Tensor,
    out_len: torch.Tensor,
    out_offset: torch.Tensor,
    out_count: int,
    in_size: int,
) -> torch.Tensor:
    """(batch, out_count, in_size) weights that resize input range ``[in_start, in_start + in_len)``
    of an axis to ``out_len`` pixels, keeping outputs ``out_offset .. out_offset + out_count``.

    Antialiased bilinear interpolation as PIL and torchvision compute it: output pixel ``i`` of a
    range scaled by ``s = in_len / out_len`` is centred at ``s (i + 0.5)`` and averages the inputs
    within ``max(s, 1)`` of it with triangle weights, normalised to sum 1.
    """
    device = in_len.device
    scale = (in_len / out_len).double()[:, None, None]
    support = scale.clamp(min=1.0)
    inv = 1.0 / support
    i = (
        out_offset.double()[:, None, None]
        + torch.arange(out_count, device=device, dtype=torch.float64)[None, :, None]
    )
    center = scale * (i + 0.5)
    xmin = (center - support + 0.5).floor().clamp(min=0)
    xmax = torch.minimum((center + support + 0.5).floor(), in_len.double()[:, None, None])
    j = (
        torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :]
        - in_start.double()[:, None, None]
    )
    w = (1 - ((j - center + 0.5) * inv).abs()).clamp(min=0) * ((j >= xmin) & (j < xmax))
    return (w / w.sum(-1, keepdim=True)).float()


def crop_resize(
    images: list[torch.Tensor],
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    size: tuple[int, int],
    flips: torch.Tensor,
) -> torch.Tensor:
    """Crop, resize and flip a list of uint8 images of any sizes into one (N, C, H, W) uint8 batch.

    ``rows``/``cols``: per image (in_start, in_len, out_len, out_offset) of each axis, as
    :func:`resize_matrix` takes them. Images are padded to a common size in chunks that bound the
    memory; the two matrix products run in full fp32 (TF32 would cost a grey level).
    """
    h, w = size
    out = torch.empty(len(images), images[0].shape[0], h, w, dtype=torch.uint8, device=images[0].device)
    order = sorted(range(len(images)), key=lambda k: images[k].shape[1] * images[k].shape[2])
    start = 0
    while start < len(order):
        chunk = [order[start]]
        while start + len(chunk) < len(order):  # grow the chunk while the padded batch stays bounded
            nxt = order[start + len(chunk)]
            hmax = max(images[k].shape[1] for k in [*chunk, nxt])
            wmax = max(images[k].shape[2] for k in [*chunk, nxt])
            if (len(chunk) + 1) * images[0].shape[0] * hmax * wmax > CHUNK_PIXELS:
                break
            chunk.append(nxt)
        out[chunk] = _crop_resize_chunk([images[k] for k in chunk], rows, cols, chunk, size, flips)
        start += len(chunk)
    return out


def _crop_resize_chunk(images, rows, cols, idx, size, flips) -> torch.Tensor:
    device = images[0].device
    hmax, wmax = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    x = torch.zeros(len(images), images[0].shape[0], hmax, wmax, device=device)
    for k, im in enumerate(images):
        x[k, :, : im.shape[1], : im.shape[2]] = im
    ix = torch.tensor(idx, device=device)
    wy = resize_matrix(*(t.to(device)[ix] for t in rows), size[0], hmax)
    wx = resize_matrix(*(t.to(device)[ix] for t in cols), size[1], wmax)
    wx = torch.where(
        flips.to(device)[ix][:, None, None], wx.flip(1), wx
    )  # a mirror reverses the output columns
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y = wy[:, None] @ x @ wx.transpose(1, 2)[:, None]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return y.round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop(height: int, width: int, seed: int) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, mirror) as torchvision's RandomResizedCrop and
    RandomHorizontalFlip draw them after ``torch.manual_seed(seed)`` (the CPU path's draws)."""
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


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side to ``shorter``, the longer one truncated."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def transform_batch(
    images: list[torch.Tensor], seeds: list[int], *, train: bool, size: int, resize: int
) -> torch.Tensor:
    """Training (random-resized crop and flip) or evaluation (resize, center crop) geometry for a
    decoded batch, as the CPU path's transforms: uint8 (N, C, size, size)."""
    top, left, h, w, mirror = [], [], [], [], []
    rows_out, cols_out = [], []
    for im, seed in zip(images, seeds, strict=True):
        height, width = im.shape[1:]
        if train:
            t, lf, hh, ww, m = random_resized_crop(height, width, seed)
            top.append(t), left.append(lf), h.append(hh), w.append(ww), mirror.append(m)
            rows_out.append((size, 0)), cols_out.append((size, 0))
        else:  # resize the whole image, keep the central crop (torchvision's CenterCrop offsets)
            rh, rw = resized_size(height, width, resize)
            top.append(0), left.append(0), h.append(height), w.append(width), mirror.append(False)
            rows_out.append((rh, round((rh - size) / 2.0)))
            cols_out.append((rw, round((rw - size) / 2.0)))

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    rows = (tensor(top), tensor(h), tensor([r[0] for r in rows_out]), tensor([r[1] for r in rows_out]))
    cols = (tensor(left), tensor(w), tensor([c[0] for c in cols_out]), tensor([c[1] for c in cols_out]))
    return crop_resize(images, rows, cols, (size, size), torch.tensor(mirror, dtype=torch.bool))


class FileBytes(Dataset):
    """(path, label) pairs -> the file's bytes (read by workers; decoding waits for the batch)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, str] | str:
        index, seed = item
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return f"{path}: {type(e).__name__}: {e.strerror}"
        if not data:
            return f"{path}: empty file"
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, seed, path


def _as_list(batch: list) -> list:
    return batch


class BatchDecodeLoader(FileLoader):
    """Files read by DataLoader workers, decoded and transformed a batch at a time on the device:
    the :class:`Loader` of large-image folders when ``data.decode`` is ``gpu``.

    Training batches hold the images that decoded; unreadable files are named on stderr and in
    ``skipped`` (or raise with ``strict``), as the CPU path's.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        batch_size: int,
        train: bool,
        size: int,
        resize: int,
        channels: int,
        workers: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        place: Placement | None = None,
        strict: bool = False,
    ) -> None:
        place = place or Placement()
        eval_args = dict(
            samples=samples, batch_size=batch_size, size=size, resize=resize, channels=channels,
            workers=workers, mean=mean, std=std, place=place, strict=strict,
        )  # fmt: skip
        super().__init__(eval_args, FileBytes(samples), _as_list, train=train)
        self.size, self.resize, self.channels = size, resize, channels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            for item in batch:
                if isinstance(item, str):
                    self._skip(item)
            read = [item for item in batch if not isinstance(item, str)]
            decoded = decode_images([r[0] for r in read], [r[3] for r in read], self.device, self.channels)
            good = []
            for r, img in zip(read, decoded, strict=True):
                if isinstance(img, str):
                    self._skip(img)
                else:
                    good.append((img, r[1], r[2]))
            if not good:
                continue
            x = transform_batch(
                [g[0] for g in good],
                [g[2] for g in good],
                train=self.train,
                size=self.size,
                resize=self.resize,
            )
            y = torch.tensor([g[1] for g in good], dtype=torch.int64).to(self.device, non_blocking=True)
            yield self.normalize(x, self.place.channels_last), y
