"""Using trained models: load a checkpoint with its classes and preprocessing, evaluate, predict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.weights import extract_state_dict, load_weights, read_file


def load_checkpoint(path: str | os.PathLike, model: str | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """A model ready for inference and its metadata (classes, preprocessing, config).

    reslab checkpoints carry their architecture; a bare state dict (torchvision, timm, ...) needs
    ``model`` to name it.
    """
    from reslab.models import create_model

    obj = read_file(path)
    arch = obj.get("arch") or model
    if arch is None:
        raise ReslabError(f"{path}: a bare state dict does not say which model it is; pass --model NAME")
    sd = extract_state_dict(obj, source=str(path))
    num_classes = obj.get("num_classes") or (sd["fc.weight"].shape[0] if "fc.weight" in sd else None)
    in_chans = obj.get("in_chans") or _first_conv_in_chans(sd)
    net = create_model(arch, num_classes=num_classes, in_chans=in_chans, **obj.get("model_args", {}))
    load_weights(net, sd)
    meta = {
        "arch": arch,
        "classes": obj.get("classes") or [str(i) for i in range(net.num_classes)],
        "preprocess": obj.get("preprocess") or default_preprocess(arch, in_chans),
        "config": obj.get("config"),
        "path": str(path),
    }
    return net.to(device).eval(), meta


def _first_conv_in_chans(sd: dict[str, torch.Tensor]) -> int:
    for k, v in sd.items():
        if k.endswith("weight") and v.ndim >= 4:
            return v.shape[1]
    return 3


def default_preprocess(arch: str, in_chans: int) -> dict[str, Any]:
    """ImageNet preprocessing for ImageNet-sized models, CIFAR-10's statistics for 32x32 ones."""
    from reslab.data.folder import IMAGENET_MEAN, IMAGENET_STD
    from reslab.models import get_model_entry

    size = list(get_model_entry(arch).spec.input_size[-2:])
    if size[0] >= 128:
        return {"kind": "imagenet", "size": size, "resize": round(size[0] * 256 / 224), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "channels": in_chans}  # fmt: skip
    return {"kind": "resize", "size": size, "mean": [0.4914, 0.4822, 0.4465][:in_chans],
            "std": [0.2470, 0.2435, 0.2616][:in_chans], "channels": in_chans}  # fmt: skip


def image_transform(preprocess: dict[str, Any]):
    """The eval transform that matches how the model was trained (a PIL image -> a normalised tensor)."""
    from torchvision.transforms import v2

    size = preprocess["size"]
    common = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(preprocess["mean"], preprocess["std"]),
    ]
    if preprocess["kind"] == "imagenet":
        return v2.Compose([v2.Resize(preprocess["resize"], antialias=True), v2.CenterCrop(size), *common])
    return v2.Compose([v2.Resize(size, antialias=True), *common])


def list_images(inputs: list[str]) -> list[Path]:
    from reslab.data.sources import IMG_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS))
        elif p.exists():
            files.append(p)
        else:
            raise ReslabError(f"{p}: no such file or folder")
    if not files:
        raise ReslabError(f"no images found in {', '.join(inputs)}")
    return files


@torch.no_grad()
def predict(model: nn.Module, meta: dict[str, Any], files: list[Path], topk: int = 5, batch_size: int = 64,
            ) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """Top-k classes and probabilities for each image; unreadable files are reported, not fatal."""
    from PIL import Image

    pre = meta["preprocess"]
    transform = image_transform(pre)
    mode = "L" if pre["channels"] == 1 else "RGB"
    device = next(model.parameters()).device
    results, skipped = [], []
    k = min(topk, len(meta["classes"]))
    for start in range(0, len(files), batch_size):
        batch, names = [], []
        for f in files[start : start + batch_size]:
            try:
                with Image.open(f) as im:
                    batch.append(transform(im.convert(mode)))
                names.append(f)
            except Exception as e:
                skipped.append(f"{f}: {type(e).__name__}: {e}")
        if not batch:
            continue
        probs = model(torch.stack(batch).to(device)).float().softmax(1)
        p, idx = probs.topk(k, dim=1)
        for f, pi, ii in zip(names, p.tolist(), idx.tolist(), strict=True):
            results.append({"file": str(f), "top": [{"class": meta["classes"][c], "index": c, "prob": q}
                                                    for c, q in zip(ii, pi, strict=True)]})  # fmt: skip
    return results, skipped


def eval_report(
    result: dict[str, Any], classes: list[str], out_dir: Path | None, title: str = ""
) -> dict[str, Any]:
    """Per-class accuracy and a confusion-matrix PNG from :func:`reslab.engine.evaluate`'s result."""
    confusion = result["confusion"].double()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    report = {"top1_err": result["err"], "top5_err": result["top5_err"], "loss": result["loss"], "n": result["n"],
              "per_class_acc": dict(zip(classes, per_class, strict=True))}  # fmt: skip
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report["confusion_png"] = str(
            plot_confusion(result["confusion"], classes, out_dir / "confusion.png", title)
        )
        (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    return report


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = min(16, 3 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 45, ha="right" if k <= 10 else "center")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised colours, counts in cells)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
