"""Decode + preprocess throughput on real JPEGs: reslab's inference pipeline vs a plain torchvision one.

    .venv/bin/python benchmarks/preprocess_throughput.py [--images ../shared/data/imagenet-samples]

Both produce normalised 224x224 batches (resize 256, center crop 224: torchvision's ImageNet eval
transforms) from the same files with the same number of DataLoader workers, in the same run.
The reference is ``ImageFolder``-style per-sample PIL -> ``weights.transforms()`` -> float tensor.
reslab decodes and crops to uint8 in the workers and normalises whole batches; its output is
pixel-identical (checked here on every file). ``--draft`` also measures JPEG draft-mode decoding
(faster, not pixel-identical). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from reslab.data import default_preprocess, image_loader


class ReferenceFiles(Dataset):
    def __init__(self, files: list[Path]) -> None:
        from torchvision.models import ResNet50_Weights

        self.files = files
        self.transform = ResNet50_Weights.IMAGENET1K_V1.transforms()  # resize 256, crop 224, normalise

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


def timed(make_batches) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = torch.cat(list(make_batches()))
    return len(out) / (time.perf_counter() - t0), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/imagenet-samples")
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--draft", action="store_true")
    args = p.parse_args()
    files = sorted(Path(args.images).glob("*.JPEG"))
    pre = default_preprocess("resnet50", 3)
    ref_loader = DataLoader(ReferenceFiles(files), batch_size=args.batch, num_workers=args.workers)
    results = {}
    for _ in range(2):  # the second pass is measured: page cache warm for both
        ref_ips, ref = timed(lambda: iter(ref_loader))
        ours_ips, ours = timed(lambda: (x for x, _ in image_loader(files, pre, args.batch, args.workers)))
        results = {"reference_img_s": ref_ips, "reslab_img_s": ours_ips}
        if args.draft:
            results["reslab_draft_img_s"], _ = timed(
                lambda: (x for x, _ in image_loader(files, pre, args.batch, args.workers, draft=True))
            )
    exact_max_diff = (ours - ref).abs().max().item()
    results.update(
        images=len(files),
        workers=args.workers,
        ratio=results["reslab_img_s"] / results["reference_img_s"],
        max_abs_diff_vs_reference=exact_max_diff,
    )
    print(
        f"{len(files)} JPEGs, {args.workers} workers: reference {results['reference_img_s']:.1f} img/s, "
        f"reslab {results['reslab_img_s']:.1f} img/s ({results['ratio']:.2f}x), max |diff| {exact_max_diff:.2e}"
        + (f", reslab draft {results['reslab_draft_img_s']:.1f} img/s" if args.draft else "")
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
