"""Using trained models: ensembles, test-time augmentation, evaluation and prediction.

Checkpoints are read by :func:`reslab.engine.read_checkpoint`; their preprocessing turns files
into inputs, and their class names label the outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.config import TTAMode, choices
from reslab.data import Placement, Preprocess, build_data, checkpoint_data, first_batch, image_loader
from reslab.data.loader import nothing_readable
from reslab.engine import Checkpoint, EvalStats, eval_report, read_checkpoint, resolve_device
from reslab.engine.device import Precise, resolve_precision
from reslab.errors import ReslabError


class Normalized(nn.Module):
    """A model that takes images in [0, 1] and normalises them with its own mean and std."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels are dim 1 for images (N, C, H, W) and clips (N, C, T, H, W) alike.
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self.model((x - self.mean.view(shape)) / self.std.view(shape))


class TTA(nn.Module):
    """Test-time augmentation: the mean softmax over views of each input, as log-probabilities.

    ``flip``: the image and its mirror. ``10crop``: the paper's ten crops (four corners and the
    centre, and their mirrors) of ``crop`` pixels; inputs larger than ``crop`` are cropped, inputs
    of the crop size are first zero-padded by ``pad`` (small images, as in training).
    """

    def __init__(self, model: nn.Module, mode: str, crop: int | None = None, pad: int = 0) -> None:
        super().__init__()
        if mode not in choices(TTAMode):
            raise ReslabError(f"--tta {mode!r}: choose {' or '.join(choices(TTAMode))}")
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


@dataclass
class Members:
    """Checkpoints (one, or an ensemble) ready to run: models that take [0, 1] inputs, in one
    precision, and the preprocessing their inputs share (unnormalised: each model normalises)."""

    nets: list[nn.Module]
    ckpts: list[Checkpoint]
    raw: Preprocess
    precision: dict[str, Any]  # "precision", and on CUDA how it was chosen and how it agrees with fp32

    @property
    def classes(self) -> list[str]:
        return self.ckpts[0].classes


def _checked(x: torch.Tensor, ckpt: Checkpoint) -> torch.Tensor:
    check_input_kind(ckpt, x.ndim - 2)
    return x


def load_members(
    paths: list[str],
    model: str | None,
    device: torch.device,
    tta: str | None = None,
    pad: int = 4,
    precision: str = "fp32",
    probe: Callable[[Preprocess, Checkpoint], torch.Tensor] | None = None,
) -> Members:
    """Read checkpoints for inference. Members may differ in architecture and normalisation, not
    in classes or input geometry. ``precision`` ``auto`` is chosen on ``probe(raw, first checkpoint)``,
    a batch of real inputs, which also gives the chosen precision's top-1 agreement with fp32."""
    loaded = [read_checkpoint(p, model, device) for p in paths]
    first = loaded[0]
    for ckpt in loaded[1:]:
        if ckpt.classes != first.classes:
            raise ReslabError(
                f"{ckpt.path}: its classes differ from {first.path}'s; an ensemble needs the same classes"
            )
        a, b = ckpt.preprocess, first.preprocess
        if (a.size, a.resize, a.channels) != (b.size, b.resize, b.channels):
            raise ReslabError(f"{ckpt.path}: its input size differs from {first.path}'s")
    raw = first.preprocess.unnormalised()
    crop = raw.crop
    if tta == "10crop" and raw.resize is not None:  # crop the ten views from the resized square
        raw = raw.replace(size=(raw.resize, raw.resize))

    def build(c: Checkpoint, p: str) -> nn.Module:
        return Normalized(Precise(c.model, p), c.preprocess.mean, c.preprocess.std).to(device).eval()

    chosen = resolve_precision(
        precision,
        lambda p: build(copy.deepcopy(first), p),
        (lambda: _checked(probe(raw, first), first)) if probe is not None else None,
        device,
    )
    nets = [build(c, chosen["precision"]) for c in loaded]
    if tta:
        nets = [TTA(n, tta, crop, pad if first.preprocess.resize is None else 0) for n in nets]
    return Members(nets, loaded, raw, chosen)


KINDS = {2: "images", 3: "video clips"}


def check_input_kind(ckpt: Checkpoint, ndim: int) -> None:
    """Refuse inputs of another kind than the model reads (images for a video model, or the
    reverse), naming both and what to run instead. Members of an ensemble share their geometry."""
    reads = getattr(getattr(ckpt.model, "spec", None), "ndim", len(ckpt.preprocess.size))
    if reads != ndim:
        fix = "predict classifies images" if reads == 2 else "evaluate it on clips (reslab eval --data clips)"
        raise ReslabError(f"{ckpt.path} is a {ckpt.arch} model of {KINDS[reads]}, given {KINDS[ndim]}; {fix}")


def predict(
    members: Members,
    files: list[Path],
    topk: int = 5,
    batch_size: int = 64,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image (the mean softmax over several models)."""
    check_input_kind(members.ckpts[0], 2)
    device = next(members.nets[0].parameters()).device
    ensemble = Ensemble(members.nets).eval()
    results = []
    classes = members.classes
    k = min(topk, len(classes))
    loader = image_loader(files, members.raw, batch_size, device=device, strict=strict)
    for x, idx in loader:
        probs = ensemble(x).exp()
        if not torch.isfinite(probs).all():
            raise ReslabError(
                f"{members.ckpts[0].path}: the model's outputs are not finite (NaN or infinite) on "
                f"{files[idx[0]]}...: its weights are broken (e.g. trained with too large a learning rate)"
            )
        p, top = probs.topk(k, dim=1)
        for i, pi, ti in zip(idx.tolist(), p.tolist(), top.tolist(), strict=True):
            results.append(
                {
                    "file": str(files[i]),
                    "top": [
                        {"class": classes[c], "index": c, "prob": q} for c, q in zip(ti, pi, strict=True)
                    ],
                }
            )
    if not results:
        raise nothing_readable(loader)
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
    precision: str = "auto",
    by_index: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint, or an ensemble of several, on the test split of the data they were
    trained on (or of ``data``/``data_dir``). Each member is scored too, in the same pass.
    ``precision``: fp32, tf32, bf16, fp16, or auto (fp32 on CPUs; the faster of bf16 and fp16 on CUDA)."""
    dev = resolve_device(device)
    built: dict[str, Any] = {}

    def eval_data(raw: Preprocess, first: Checkpoint) -> Any:
        if not built:
            cfg, seed = checkpoint_data(first.config, data=data, data_dir=data_dir, source=str(paths[0]))
            place = Placement(dev, seed=seed)
            built.update(
                cfg=cfg,
                data=build_data(cfg, place=place, channels=raw.channels, preprocess=raw, progress=False),
            )
        return built["data"]

    members = load_members(
        paths,
        model,
        dev,
        tta,
        pad=4,
        precision=precision,
        probe=lambda raw, first: first_batch(eval_data(raw, first).eval),
    )
    ckpts, classes = members.ckpts, members.classes
    d = eval_data(members.raw, ckpts[0])
    check_input_kind(ckpts[0], d.ndim)
    cfg = built["cfg"]
    if len(d.classes) != len(classes):
        raise ReslabError(f"{paths[0]} predicts {len(classes)} classes but {cfg.name} has {len(d.classes)}")
    if d.classes != classes and not by_index:
        differ = [f"{a} vs {b}" for a, b in zip(d.classes, classes, strict=True) if a != b]
        raise ReslabError(
            f"the data's classes are not the checkpoint's ({len(differ)} differ, e.g. {differ[0]}): its "
            "errors would be counted against the wrong names; evaluate on data with the same class "
            "folders, or pass --classes-by-index to match classes by position"
        )
    ensemble = Ensemble(members.nets).eval()
    member_stats = [EvalStats(dev) for _ in members.nets]
    stats = EvalStats(dev)
    for x, y in d.eval:
        outs = ensemble.member_log_probs(x)
        for s, out in zip(member_stats, outs, strict=True):
            s.add(out, y)
        stats.add(combine(outs), y)
    result = stats.result()
    if not math.isfinite(result["loss"]):
        raise ReslabError(
            f"{paths[0]}: the model's outputs are not finite (NaN or infinite) on the {d.eval_split} "
            "images: its weights are broken (e.g. trained with too large a learning rate)"
        )
    names = " + ".join(c.arch for c in ckpts)
    title = f"{names} on {cfg.name} {d.eval_split}{f' ({tta} TTA)' if tta else ''}: {100 * result['err']:.2f}% error"
    report = eval_report(result, classes, out_dir, title)
    scores = [
        {"checkpoint": c.path, "arch": c.arch, **{k: v for k, v in s.result().items() if k != "confusion"}}
        for c, s in zip(ckpts, member_stats, strict=True)
    ]
    return {
        "checkpoints": list(map(str, paths)),
        "arch": names,
        "data": cfg.name,
        "split": d.eval_split,
        "tta": tta,
        **report,
        "precision": members.precision,
        "members": scores,
    }
