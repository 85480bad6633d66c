"""JPEG batches decoded on the GPU: the batched path, and ``data.decode: auto``'s measured choice.

DataLoader workers only read files; each batch leaves a worker as one uint8 buffer of all its
files' bytes with their lengths. A background thread (:func:`~reslab.data.loader.in_background`,
on its own CUDA stream) decodes the batch's JPEGs in one nvjpeg call, applies the same
:class:`~reslab.data.decode.Geometry` as the CPU path to each image on the GPU (one resize of the
crop itself: no padding to a common size) and normalises, while the training step runs. Other
formats (PNG, ...) and any JPEG the batched call refuses are decoded one by one on the CPU, so one
broken file does not cost the batch.

Without CUDA the same code runs on the CPU (libjpeg-turbo instead of nvjpeg, one thread): that is
how the tests exercise it. ``auto`` never picks it there.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from reslab.data.decode import Geometry, decode_bytes, decode_jpegs, describe_failure, is_jpeg, load_image
from reslab.data.folder import FileLoader, read_bytes
from reslab.errors import ReslabError

# auto measures both paths on this many files (a second or less), and only when a job has at
# least as many: a handful of files never repays starting a GPU decoder.
PROBE_FILES = 64


class FileBytes(Dataset):
    """(path, label) pairs -> (the file's bytes, label, seed, path), or a skip message naming it."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[bytes, int, int, str] | str:
        index, seed = item
        path, label = self.samples[index]
        data = read_bytes(path)
        return data if isinstance(data, str) else (data, label, seed, path)


@dataclass
class PackedFiles:
    """A batch of files as one uint8 buffer (what a worker hands over: one shared-memory block,
    not one per file), the byte length of each file, and their labels, seeds and paths."""

    buffer: torch.Tensor
    lengths: list[int]
    labels: torch.Tensor
    seeds: list[int]
    paths: list[str]
    skipped: list[str]

    def pin_memory(self) -> PackedFiles:  # DataLoader(pin_memory=True) calls this
        self.buffer, self.labels = self.buffer.pin_memory(), self.labels.pin_memory()
        return self

    def files(self) -> list[torch.Tensor]:
        return list(self.buffer.split(self.lengths)) if self.lengths else []


def pack_files(batch: list) -> PackedFiles:
    read = [b for b in batch if not isinstance(b, str)]
    return PackedFiles(
        torch.frombuffer(bytearray(b"".join(r[0] for r in read)), dtype=torch.uint8)
        if read
        else torch.empty(0, dtype=torch.uint8),
        [len(r[0]) for r in read],
        torch.tensor([r[1] for r in read], dtype=torch.int64),
        [r[2] for r in read],
        [r[3] for r in read],
        [b for b in batch if isinstance(b, str)],
    )


def decode_images(
    datas: list[torch.Tensor], paths: list[str], device: torch.device, channels: int = 3
) -> list[torch.Tensor | str]:
    """Each file's bytes as a uint8 (C, H, W) image on ``device``, or a skip message naming the file.

    JPEGs are decoded in one batched call; other formats and any JPEG the batched call refuses are
    decoded one by one on the CPU.
    """
    out: list[torch.Tensor | str | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if is_jpeg(d)]
    if jpegs:
        try:
            for i, img in zip(jpegs, decode_jpegs([datas[i] for i in jpegs], device, channels), strict=True):
                out[i] = img
        except RuntimeError:  # a corrupt JPEG in the batch: find it below, one file at a time
            pass
    for i, d in enumerate(datas):
        if out[i] is None:
            try:
                out[i] = decode_bytes(d, channels).to(device, non_blocking=True)
            except Exception as e:  # decoders raise many kinds for truncated or non-image files
                out[i] = describe_failure(paths[i], e)
    return out


class BatchDecodeLoader(FileLoader):
    """Files read by DataLoader workers, decoded and transformed a batch at a time on the device:
    the :class:`Loader` of large-image folders when ``data.decode`` is ``gpu``.

    Batches hold the images that decoded; unreadable files are named on stderr and in ``skipped``
    (or raise with ``strict``), as the CPU path's.
    """

    background = True  # decoding runs in this process: always beside the training step
    decode = "gpu"

    collate = staticmethod(pack_files)

    def files(self, samples: list[tuple[str, int]]) -> Dataset:
        return FileBytes(samples)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for packed in self.loader:
            for msg in packed.skipped:
                self._skip(msg)
            decoded = decode_images(packed.files(), packed.paths, self.device, self.channels)
            keep, images = [], []
            for i, img in enumerate(decoded):
                if isinstance(img, str):
                    self._skip(img)
                else:
                    keep.append(i)
                    images.append(self.geometry(img, packed.seeds[i]))
            if not images:
                continue
            x = torch.stack(images)
            y = packed.labels[keep].to(self.device, non_blocking=True)
            yield self.normalize(x, self.place.channels_last), y


# --- which path: data.decode ---------------------------------------------------------------------


def gpu_decoder_works(device: torch.device) -> bool:
    """Whether this torchvision decodes JPEGs on ``device`` (nvjpeg)."""
    if device.type != "cuda":
        return False
    import torchvision

    try:
        tiny = torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        decode_jpegs([tiny], device)
        return True
    except (RuntimeError, AttributeError):
        return False


def measure_paths(
    samples: list[tuple[str, int]], geometry: Geometry, channels: int, device: torch.device, workers: int
) -> dict[str, float]:
    """Images per second of each path on (up to :data:`PROBE_FILES` of) these files, here.

    ``cpu``: one image after another in this process on one thread, as a worker runs, times the
    workers (they decode in parallel on their own cores). ``gpu``: the batched decode and geometry
    on ``device``, after one warm-up call (nvjpeg's start-up). Files are read beforehand: reading
    costs both paths the same.
    """
    datas = [d for d in (read_bytes(p) for p, _ in samples[:PROBE_FILES]) if not isinstance(d, str)]
    if not datas:
        raise ReslabError(f"{samples[0][0]}...: none of the first {PROBE_FILES} files could be read")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for i, data in enumerate(datas):
            with contextlib.suppress(Exception):  # an unreadable file costs what it costs here
                load_image(data, geometry, i, channels)
        cpu = len(datas) * max(1, workers) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    paths = [p for p, _ in samples[: len(tensors)]]

    def gpu_batch() -> None:
        for i, img in enumerate(decode_images(tensors, paths, device, channels)):
            if not isinstance(img, str):
                geometry(img, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gpu_batch()
    t0 = time.perf_counter()
    gpu_batch()
    return {"cpu": cpu, "gpu": len(tensors) / (time.perf_counter() - t0)}


def choose_decode(
    choice: str,
    device: torch.device,
    samples: list[tuple[str, int]],
    geometry: Geometry,
    channels: int,
    workers: int,
) -> tuple[str, dict[str, Any]]:
    """The path ``data.decode`` means here (``cpu`` or ``gpu``) and how it was chosen.

    ``auto``: on a CUDA device whose torchvision decodes JPEGs there, both paths are measured on
    the first files (:func:`measure_paths`) and the faster one runs; anywhere else, and for jobs of
    fewer than :data:`PROBE_FILES` files, the CPU path (the batched path decodes in one thread on a
    CPU: slower than workers on every core; README, "Large JPEG datasets"). ``gpu`` without CUDA
    runs the batched path on the CPU (said once).
    """
    if choice == "cpu":
        return "cpu", {"chosen": "asked"}
    if choice == "gpu":
        if device.type != "cuda":
            warnings.warn("decode=gpu without a CUDA device: batches are decoded on the CPU", stacklevel=2)
        elif not gpu_decoder_works(device):
            raise ReslabError(
                "decode=gpu: this torchvision cannot decode JPEGs on CUDA (nvjpeg); use decode=cpu"
            )
        return "gpu", {"chosen": "asked"}
    if device.type != "cuda":
        return "cpu", {"chosen": "auto: no CUDA device"}
    if len(samples) < PROBE_FILES:
        return "cpu", {"chosen": f"auto: fewer than {PROBE_FILES} files"}
    if not gpu_decoder_works(device):
        return "cpu", {"chosen": "auto: this torchvision cannot decode JPEGs on this GPU"}
    spread = samples[:: max(1, len(samples) // PROBE_FILES)]  # every class, not the first one's files
    rates = measure_paths(spread, geometry, channels, device, workers)
    best = max(rates, key=rates.get)
    return best, {"chosen": "auto: measured", "img_s": rates}
