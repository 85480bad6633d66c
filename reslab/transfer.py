"""Transfer learning: pretrained weights in, a new head, frozen and unfrozen stages.

Sources: reslab checkpoints, any file ``load_weights`` reads (with ``--model``), and torchvision's
published weights by name (``torchvision:resnet50.IMAGENET1K_V2``), read from torchvision's cache
(``$TORCH_HOME/hub/checkpoints``) and downloaded there when online. The preprocessing that belongs
to the weights (resize, crop, mean/std) and their class names come with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.config import FinetuneConfig, TrainConfig
from reslab.errors import ReslabError
from reslab.models import ResNet
from reslab.weights import extract_state_dict, load_weights, read_file


@dataclass
class Pretrained:
    """Weights and what belongs to them."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    preprocess: dict[str, Any] | None  # None: let the target data decide (a bare weights file)
    classes: list[str] | None
    model_args: dict[str, Any]
    origin: str


def torchvision_weights(spec: str) -> Pretrained:
    """``resnet50.IMAGENET1K_V2`` -> torchvision's weights, from its cache or downloaded into it."""
    import torchvision

    arch, _, tag = spec.partition(".")
    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = enum[tag] if tag else enum.DEFAULT
    except (ValueError, KeyError):
        raise ReslabError(
            f"torchvision:{spec}: unknown weights (e.g. torchvision:resnet50.IMAGENET1K_V2)"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
        except Exception as e:
            raise ReslabError(
                f"torchvision:{spec}: weights not cached and the download failed ({type(e).__name__}); "
                f"download {weights.url} and place it at {cached}"
            ) from None
    t = weights.transforms()
    preprocess = {
        "kind": "imagenet",
        "size": [t.crop_size[0]] * 2,
        "resize": t.resize_size[0],
        "mean": list(t.mean),
        "std": list(t.std),
        "channels": 3,
    }
    return Pretrained(
        arch,
        extract_state_dict(read_file(cached), source=str(cached)),
        preprocess,
        list(weights.meta.get("categories") or []),
        {},
        f"torchvision:{arch}.{weights.name}",
    )


def load_source(source: str, model: str | None = None) -> Pretrained:
    if source.startswith("torchvision:"):
        return torchvision_weights(source.split(":", 1)[1])
    obj = read_file(source)
    arch = obj.get("arch") or model
    if arch is None:
        raise ReslabError(f"{source}: a bare state dict does not say which model it is; pass --model NAME")
    return Pretrained(
        arch,
        extract_state_dict(obj, source=source),
        obj.get("preprocess"),
        obj.get("classes"),
        dict(obj.get("model_args") or {}),
        str(source),
    )


def finetune_config(
    source: str, data_dir: str, *, model: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The training config of a fine-tuning run: the ``finetune`` recipe, the source's architecture
    and preprocessing, a 20% validation split when the folder has none, then ``overrides``."""
    from reslab.config import load_config
    from reslab.data.sources import find_splits

    pre = load_source(source, model)
    tree = {"model": model or pre.arch, "data.dir": data_dir, "finetune.source": source, **(overrides or {})}
    if pre.preprocess:  # the weights' own preprocessing: nobody retypes ImageNet's mean/std
        size = pre.preprocess["size"][-1]
        tree.setdefault("data.image_size", size)
        tree.setdefault("data.resize", pre.preprocess.get("resize", size))
        tree.setdefault("data.mean", pre.preprocess["mean"])
        tree.setdefault("data.std", pre.preprocess["std"])
    if "data.val_split" not in tree and find_splits(Path(data_dir))[1] is None:
        tree["data.val_split"] = 0.2
    return load_config("finetune", tree)


def adapt_first_conv(weight: torch.Tensor, in_chans: int, mode: str = "auto") -> torch.Tensor:
    """Pretrained RGB filters for ``in_chans`` inputs.

    ``sum``: one channel gets the sum of the RGB filters, so a grey image gives exactly the output
    the RGB model gives on that image replicated to three channels. ``repeat``: the RGB filters are
    tiled over the new channels and scaled by 3/in_chans, keeping the activation scale (satellite
    and medical images with 4+ bands).
    """
    have = weight.shape[1]
    if in_chans == have:
        return weight
    if mode == "auto":
        mode = "sum" if in_chans == 1 else "repeat"
    if mode == "sum":
        summed = weight.sum(1, keepdim=True)
        return summed if in_chans == 1 else summed.repeat(1, in_chans, *[1] * (weight.ndim - 2)) / in_chans
    reps = -(-in_chans // have)
    return weight.repeat(1, reps, *[1] * (weight.ndim - 2))[:, :in_chans] * (have / in_chans)


def build_finetune_model(
    pre: Pretrained,
    num_classes: int,
    in_chans: int,
    ft: FinetuneConfig,
    model: str | None,
    model_args: dict[str, Any],
) -> ResNet:
    """The pretrained network with a fresh head for ``num_classes`` and its first conv adapted."""
    from reslab.models import create_model

    arch = model or pre.arch
    net = create_model(arch, num_classes=num_classes, in_chans=in_chans, **{**pre.model_args, **model_args})
    sd = dict(pre.state_dict)
    first = next(k for k, v in sd.items() if v.ndim >= 4)  # the stem's first conv
    sd[first] = adapt_first_conv(sd[first], in_chans, ft.in_chans_mode)
    load_weights(net, sd, ignore_head=True)
    return net


def parse_freeze(spec: str, stages: int) -> int:
    """How many stages (after the stem) a freeze spec freezes; ``base`` freezes them all."""
    if spec == "none":
        return -1
    if spec == "base":
        return stages
    match = re.fullmatch(r"stages:(\d+)", spec)
    if not match or int(match.group(1)) > stages:
        raise ReslabError(f"--freeze {spec!r}: use base, none, or stages:N with N <= {stages}")
    return int(match.group(1))


def parse_unfreeze(items: list[str], stages: int) -> list[tuple[int, int]]:
    events = []
    for item in items:
        match = re.fullmatch(r"(\d+):(\d+)", item)
        if not match or not 1 <= int(match.group(2)) <= stages:
            raise ReslabError(
                f"--unfreeze-at {item!r}: EPOCH:N unfreezes the last N stages (1..{stages}) at EPOCH"
            )
        events.append((int(match.group(1)), int(match.group(2))))
    return sorted(events)


class _EvalBN:
    """Mixed into a BatchNorm's class while its part of the network is frozen: it stays in eval mode
    (running statistics fixed) whatever ``model.train()`` says. State-dict keys do not change."""

    def train(self, mode: bool = True):  # type: ignore[override]
        return super().train(False)


_EVAL_CLASSES: dict[type, type] = {}


def _set_bn_frozen(module: nn.Module, frozen: bool) -> None:
    for m in module.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        base = next((b for b in type(m).__mro__ if b in _EVAL_CLASSES.values()), None)
        if frozen and base is None:
            cls = type(m)
            _EVAL_CLASSES.setdefault(cls, type(f"Eval{cls.__name__}", (_EvalBN, cls), {}))
            m.__class__ = _EVAL_CLASSES[cls]
            m.eval()
        elif not frozen and base is not None:
            m.__class__ = next(c for c, e in _EVAL_CLASSES.items() if e is type(m))


class Freezer:
    """Which parts of a fine-tuned network train at each epoch: the head always; the stem and the
    first stages as ``freeze`` says until an ``unfreeze_at`` event releases the last N stages."""

    def __init__(self, model: ResNet, ft: FinetuneConfig) -> None:
        self.model, self.ft = model, ft
        self.n = len(model.stage_names)
        self.frozen_stages = parse_freeze(ft.freeze, self.n)
        self.events = parse_unfreeze(ft.unfreeze_at, self.n)

    def parts(self) -> list[tuple[str, list[nn.Module]]]:
        """(name, modules) from the input side: the stem, each stage, then the final norm and head."""
        m = self.model
        tail = [x for x in (m.norm, m.fc) if x is not None]
        return (
            [("stem", [getattr(m, s) for s in m.stem_names])]
            + [(s, [getattr(m, s)]) for s in m.stage_names]
            + [("head", tail)]
        )

    def trainable_from(self, epoch: int) -> int:
        """Index into parts() of the first trainable part at ``epoch`` (0-based)."""
        if self.frozen_stages < 0:
            return 0
        first = self.frozen_stages + 1  # stem + frozen stages are parts 0..frozen_stages
        for at, last_n in self.events:
            if epoch >= at:
                first = min(first, self.n + 1 - last_n)
        return first

    def apply(self, epoch: int) -> list[str]:
        """Set requires_grad and BN modes for ``epoch``; returns the names of the trainable parts."""
        first = self.trainable_from(epoch)
        trainable = []
        for i, (name, modules) in enumerate(self.parts()):
            train = i >= first
            for module in modules:
                module.requires_grad_(train)
                if self.ft.frozen_bn == "eval":
                    _set_bn_frozen(module, not train)
            if train:
                trainable.append(name)
        return trainable

    def param_groups(self, head_lr: float, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimizer group per part (the head at ``head_lr``, the rest at ``base_lr``), all from the
        start: unfreezing flips requires_grad, so a resumed run's optimizer state always fits."""
        groups = []
        for name, modules in self.parts():
            params = [p for module in modules for p in module.parameters()]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": head_lr if name == "head" else base_lr,
                        "weight_decay": weight_decay,
                        "name": name,
                    }
                )
        return groups


def to_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace the BatchNorm2d layers of ``module`` by FrozenBatchNorm2d (fixed affine maps)."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            to_frozen_batchnorm(child)
    return module
