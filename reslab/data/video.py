"""Video clips for the 3D ResNets: folders of clips or of frames, and a synthetic set for tests.

Clips are decoded once into uint8 tensors (N, C, T, H, W): ``frames`` frames sampled uniformly
over each clip, resized to ``size`` x ``size``. The in-memory loader then batches and augments
them like small images (the crop and flip apply to every frame of a clip alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reslab.data.sources import IMG_EXTENSIONS, ImageArrays
from reslab.errors import ReslabError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MOTIONS = ("right", "left", "down", "up")


def synthetic_clips(n: int, frames: int = 8, size: int = 32, seed: int = 0) -> ImageArrays:
    """Clips of a bright square moving right, left, down or up over noise: the class is the motion.

    A single frame does not tell the classes apart (the square can be anywhere), so a model must
    use time to learn them: a small, honest test of spatiotemporal convolutions.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(MOTIONS)
    clips = torch.randint(0, 60, (n, 1, frames, size, size), generator=g, dtype=torch.uint8)
    side = max(2, size // 6)
    travel = size - side
    speed = max(1, travel // (2 * max(1, frames - 1)))
    path = speed * (frames - 1)  # the square always travels this far, whatever its start
    for i, label in enumerate(labels.tolist()):
        start = int(torch.randint(0, max(1, travel - path + 1), (1,), generator=g))
        across = int(torch.randint(0, travel + 1, (1,), generator=g))
        for t in range(frames):
            pos = min(travel, start + t * speed if label in (0, 2) else start + path - t * speed)
            y, x = (across, pos) if label < 2 else (pos, across)
            clips[i, 0, t, y : y + side, x : x + side] = 230
    return ImageArrays(clips.expand(-1, 3, -1, -1, -1).contiguous(), labels, list(MOTIONS))


def _sample_indices(length: int, frames: int) -> list[int]:
    if length <= 0:
        return []
    return np.linspace(0, length - 1, frames).round().astype(int).tolist()


def _resize_clip(frames: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, size, size) uint8, antialiased bilinear."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)


def read_clip(path: Path, frames: int, size: int) -> torch.Tensor:
    """One clip (a video file or a folder of frame images) as (3, frames, size, size) uint8."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        picks = [files[i] for i in _sample_indices(len(files), frames)]
        if not picks:
            raise ReslabError(f"{path}: a clip folder with no frame images")
        return _resize_clip(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picks]), size)
    try:  # PyAV: only for video files, and optional for users
        import av
    except ImportError:
        raise ReslabError(
            f"{path}: reading video files needs PyAV (pip install av), or use folders of frames"
        ) from None
    try:
        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:
        raise ReslabError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None
    picks = [decoded[i] for i in _sample_indices(len(decoded), frames)]
    if not picks:
        raise ReslabError(f"{path}: no frames")
    return _resize_clip(np.stack(picks), size)


def load_clip_folder(root: Path, frames: int, size: int) -> ImageArrays:
    """``root/<class>/<clip>.mp4`` or ``root/<class>/<clip>/<frame>.jpg`` -> decoded clips."""
    if not root.is_dir():
        raise ReslabError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ReslabError(f"{root}: no class folders (expected {root}/<class>/<clip>)")
    clips, labels, skipped = [], [], []
    for label, c in enumerate(classes):
        items = sorted(p for p in (root / c).iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_EXTENSIONS)
        if not items:
            raise ReslabError(f"{root / c}: class folder has no clips; remove it or add clips")
        for item in items:
            try:
                clips.append(read_clip(item, frames, size))
                labels.append(label)
            except ReslabError as e:
                if "PyAV" in str(e):
                    raise
                skipped.append(str(e))
    if not clips:
        raise ReslabError(f"{root}: no clip could be read (first error: {skipped[0]})")
    return ImageArrays(torch.stack(clips), torch.tensor(labels), classes, skipped)
