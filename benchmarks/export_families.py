"""Export and verify one model of every registered 2D family in every format, on real images.

    .venv/bin/python benchmarks/export_families.py [--images ../shared/data/imagenet-samples]
        [--fold-bn] [--formats onnx,torchscript,exported,pte,coreml]

For each family (as `reslab models` groups them) the first registered model is built with random
weights and random BN statistics, exported to ONNX (run by ONNX Runtime), TorchScript, a
torch.export program, an ExecuTorch program (run by ExecuTorch's runtime; BatchNorm folded, and
the pre-activation nets' remaining BatchNorms decomposed for XNNPACK) and a Core ML package (its
spec read back: Core ML runs on macOS only), each verified against PyTorch on 8 real images with
``reslab.deploy.export.export_model``: max abs difference and top-1 agreement. ImageNet-sized
families read the JPEGs at 224x224 (resize 256, crop 224), CIFAR-sized ones at 32x32. Prints a
table and one JSON line; exits non-zero if any export fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from reslab import create_model, list_models
from reslab.data import default_preprocess, image_loader, list_images
from reslab.deploy.export import FORMATS, export_model
from reslab.engine import Checkpoint
from reslab.models import get_model_entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/imagenet-samples")
    )
    p.add_argument("--fold-bn", action="store_true")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    args = p.parse_args()
    families: dict[str, str] = {}
    for name in list_models():
        entry = get_model_entry(name)
        if entry.spec.ndim == 2:
            families.setdefault(entry.family, name)
    files = list_images([args.images])[:8]
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for family, name in families.items():
            torch.manual_seed(0)
            model = create_model(name).eval()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.1, 0.1)
                        m.running_var.uniform_(0.5, 1.5)
            pre = default_preprocess(name, 3, tuple(str(i) for i in range(model.num_classes)))
            ckpt = Checkpoint(model, name, pre, path=name)
            x = torch.cat([b for b, _ in image_loader(files, pre, batch_size=8, workers=0)])
            for fmt in args.formats.split(","):
                t0 = time.perf_counter()
                try:
                    r = export_model(
                        ckpt,
                        fmt,
                        Path(tmp) / f"{name}{FORMATS[fmt].suffix}",
                        fold_bn=args.fold_bn,
                        verify_inputs=x,
                    )
                    status = "ok"
                except Exception as e:  # a failed export is a row of the table, not the end of the run
                    r, status, failed = {}, f"FAILED: {str(e).splitlines()[0][:80]}", failed + 1
                rows.append(
                    {
                        "family": family,
                        "model": name,
                        "format": fmt,
                        "status": status,
                        "max_abs_diff": r.get("max_abs_diff"),
                        "verified_with": r.get("verified_with"),
                        "top1_agreement": r.get("top1_agreement"),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                print(
                    f"{family:26s} {name:18s} {fmt:12s} {status:8s} "
                    f"diff {r.get('max_abs_diff', float('nan')):.2e}  agree {r.get('top1_agreement', 0):.2f}  "
                    f"{rows[-1]['seconds']}s",
                    flush=True,
                )
    print(json.dumps({"exports": len(rows), "failed": failed, "fold_bn": args.fold_bn, "rows": rows}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
