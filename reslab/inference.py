"""Using trained models: load a checkpoint with its classes and preprocessing, evaluate, predict."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.weights import extract_state_dict, load_weights, read_file


def load_checkpoint(
    path: str | os.PathLike, model: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
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


class Normalized(nn.Module):
    """A model that takes images in [0, 1] and normalises them with its own mean and std."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        shape = (1, len(mean)) + (1,) * ((getattr(model, "spec", None) and model.spec.ndim) or 2)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class TTA(nn.Module):
    """Test-time augmentation: the mean softmax over views of each input, as log-probabilities.

    ``flip``: the image and its mirror. ``10crop``: the paper's ten crops (four corners and the
    centre, and their mirrors) of ``crop`` pixels; inputs larger than ``crop`` are cropped, inputs
    of the crop size are first zero-padded by ``pad`` (small images, as in training).
    """

    def __init__(self, model: nn.Module, mode: str, crop: int | None = None, pad: int = 0) -> None:
        super().__init__()
        if mode not in ("flip", "10crop"):
            raise ReslabError(f"--tta {mode!r}: choose flip or 10crop")
        self.model, self.mode, self.crop, self.pad = model, mode, crop, pad

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.mode == "flip":
            return [x, x.flip(-1)]
        c = self.crop or x.shape[-1]
        if x.shape[-1] <= c and self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4)
        h, w = x.shape[-2:]
        if h < c or w < c:
            raise ReslabError(f"10-crop: input {h}x{w} is smaller than the {c}-pixel crop")
        tops = [(0, 0), (0, w - c), (h - c, 0), (h - c, w - c), ((h - c) // 2, (w - c) // 2)]
        crops = [x[..., t : t + c, s : s + c] for t, s in tops]
        return crops + [v.flip(-1) for v in crops]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([self.model(v).float().softmax(1) for v in self.views(x)]).mean(0)
        return probs.clamp_min(1e-12).log()


class Ensemble(nn.Module):
    """Model blending: the mean of the members' softmax outputs, as log-probabilities."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_log_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x).float().log_softmax(1) for m in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(self.member_log_probs(x))


def combine(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log(mean(softmax)) of several members' log-probabilities."""
    return torch.logsumexp(torch.stack(log_probs), 0) - torch.log(torch.tensor(float(len(log_probs))))


def load_members(
    paths: list[str], model: str | None, device: torch.device, tta: str | None = None, pad: int = 4
) -> tuple[list[nn.Module], list[dict[str, Any]], dict[str, Any]]:
    """Checkpoints as models that take [0, 1] inputs, their metadata, and the shared raw preprocessing.

    Members may differ in architecture and normalisation, not in classes or input geometry.
    """
    loaded = [load_checkpoint(p, model, device) for p in paths]
    first = loaded[0][1]
    for _, meta in loaded[1:]:
        if meta["classes"] != first["classes"]:
            raise ReslabError(
                f"{meta['path']}: its classes differ from {first['path']}'s; an ensemble needs the same classes"
            )
        keys = ("kind", "size", "channels", "resize")
        if any(meta["preprocess"].get(k) != first["preprocess"].get(k) for k in keys):
            raise ReslabError(f"{meta['path']}: its input size differs from {first['path']}'s")
    pre = first["preprocess"]
    raw = {**pre, "mean": [0.0] * pre["channels"], "std": [1.0] * pre["channels"]}
    crop = pre["size"][-1]
    if tta == "10crop" and pre["kind"] == "imagenet":  # crop the ten views from the resized square
        raw["size"] = [pre["resize"], pre["resize"]]
    nets = [
        Normalized(net, meta["preprocess"]["mean"], meta["preprocess"]["std"]).to(device).eval()
        for net, meta in loaded
    ]
    if tta:
        nets = [TTA(n, tta, crop, pad if pre["kind"] != "imagenet" else 0) for n in nets]
    return nets, [meta for _, meta in loaded], raw


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
        return {
            "kind": "imagenet",
            "size": size,
            "resize": round(size[0] * 256 / 224),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "channels": in_chans,
        }
    return {
        "kind": "resize",
        "size": size,
        "mean": [0.4914, 0.4822, 0.4465][:in_chans],
        "std": [0.2470, 0.2435, 0.2616][:in_chans],
        "channels": in_chans,
    }


def image_transform(preprocess: dict[str, Any]):
    """The eval geometry that matches how the model was trained: a PIL image -> a uint8 tensor
    (resize + center crop for ImageNet-style models, as torchvision's eval transforms)."""
    from torchvision.transforms import v2

    from reslab.data.folder import imagenet_transforms

    if preprocess["kind"] == "imagenet":
        return imagenet_transforms(False, preprocess["size"][-1], preprocess["resize"])
    return v2.Compose([v2.Resize(preprocess["size"], antialias=True), v2.PILToTensor()])


def list_images(inputs: list[str], strict: bool = False) -> list[Path]:
    """Image files named directly or found in folders; other files in folders are reported (or, with
    ``strict``, refused)."""
    from reslab.data.sources import IMG_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            others = [f for f in found if f.suffix.lower() not in IMG_EXTENSIONS]
            for f in others:
                if strict:
                    raise ReslabError(f"{f}: not an image file (drop --strict to skip such files)")
                print(f"reslab: skipping {f}: not an image file", file=sys.stderr)
            files.extend(f for f in found if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise ReslabError(f"{p}: no such file or folder")
    if not files:
        raise ReslabError(f"no images found in {', '.join(inputs)}")
    return files


def image_loader(
    files: list[Path],
    preprocess: dict[str, Any],
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    strict: bool = False,
    draft: bool = False,
):
    """Batches of (normalised images, file indices) for a list of files, decoded by DataLoader workers.

    Unreadable files are named on stderr and skipped (their indices are absent), or raise with
    ``strict``. ``draft`` lets the JPEG decoder downscale while decoding (faster, not pixel-exact).
    """
    from reslab.data.folder import FolderLoader

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    draft_size = preprocess.get("resize") if draft and preprocess["kind"] == "imagenet" else None
    return FolderLoader(
        [(str(f), i) for i, f in enumerate(files)],
        image_transform(preprocess),
        batch_size=batch_size,
        train=False,
        channels=preprocess["channels"],
        workers=workers if len(files) > batch_size else 0,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        device=device,
        strict=strict,
        draft=draft_size,
    )


@torch.no_grad()
def predict(
    nets: list[nn.Module],
    classes: list[str],
    raw: dict[str, Any],
    files: list[Path],
    topk: int = 5,
    batch_size: int = 64,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image (the mean softmax over several models)."""
    device = next(nets[0].parameters()).device
    ensemble = Ensemble(nets).eval()
    results = []
    k = min(topk, len(classes))
    for x, idx in image_loader(files, raw, batch_size, device=device, strict=strict):
        p, top = ensemble(x).exp().topk(k, dim=1)
        for i, pi, ti in zip(idx.tolist(), p.tolist(), top.tolist(), strict=True):
            results.append(
                {
                    "file": str(files[i]),
                    "top": [
                        {"class": classes[c], "index": c, "prob": q} for c, q in zip(ti, pi, strict=True)
                    ],
                }
            )
    return results


@torch.no_grad()
def evaluate_checkpoints(
    paths: list[str],
    *,
    data: str | None = None,
    data_dir: str | None = None,
    model: str | None = None,
    device: str = "auto",
    out_dir: Path | None = None,
    tta: str | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint, or an ensemble of several, on the test split of the data they were
    trained on (or of ``data``/``data_dir``). Each member is scored too, in the same pass."""
    from reslab.data import build_data, checkpoint_data
    from reslab.engine.loop import EvalStats, resolve_device

    dev = resolve_device(device)
    pad = 4
    nets, metas, raw = load_members(paths, model, dev, tta, pad)
    cfg, seed = checkpoint_data(metas[0], data=data, data_dir=data_dir)
    classes = metas[0]["classes"]
    d = build_data(cfg, seed=seed, device=dev, channels=raw["channels"], preprocess=raw, progress=False)
    if len(d.classes) != len(classes):
        raise ReslabError(f"{paths[0]} predicts {len(classes)} classes but {cfg.name} has {len(d.classes)}")
    ensemble = Ensemble(nets).eval()
    member_stats = [EvalStats(dev) for _ in nets]
    stats = EvalStats(dev)
    for x, y in d.eval:
        outs = ensemble.member_log_probs(x)
        for s, out in zip(member_stats, outs, strict=True):
            s.add(out, y)
        stats.add(combine(outs), y)
    result = stats.result()
    names = " + ".join(m["arch"] for m in metas)
    title = f"{names} on {cfg.name} {d.eval_split}{f' ({tta} TTA)' if tta else ''}: {100 * result['err']:.2f}% error"
    report = eval_report(result, classes, out_dir, title)
    members = [
        {
            "checkpoint": m["path"],
            "arch": m["arch"],
            **{k: v for k, v in s.result().items() if k != "confusion"},
        }
        for m, s in zip(metas, member_stats, strict=True)
    ]
    return {
        "checkpoints": list(map(str, paths)),
        "arch": names,
        "data": cfg.name,
        "split": d.eval_split,
        "tta": tta,
        **report,
        "members": members,
    }


def eval_report(
    result: dict[str, Any], classes: list[str], out_dir: Path | None, title: str = ""
) -> dict[str, Any]:
    """Per-class accuracy and a confusion-matrix PNG from :func:`reslab.engine.evaluate`'s result."""
    confusion = result["confusion"].double()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    report = {
        "top1_err": result["err"],
        "top5_err": result["top5_err"],
        "loss": result["loss"],
        "n": result["n"],
        "per_class_acc": dict(zip(classes, per_class, strict=True)),
    }
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
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised colours, counts in cells)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
