"""Transfer learning: pretrained weights in, a new head, frozen and unfrozen stages.

Fine-tuning is a policy on top of training (:class:`FinetunePolicy`): it builds the pretrained
model with a fresh head, gives the optimizer one parameter group per part, unfreezes parts at
the epochs the schedule names, and keeps the BatchNorm statistics of frozen parts fixed. The
engine trains whatever the policy hands it.

Sources: reslab checkpoints, any file ``load_weights`` reads (with ``--model``), and torchvision's
published weights by name (``torchvision:resnet50.IMAGENET1K_V2``), read from torchvision's cache
(``$TORCH_HOME/hub/checkpoints``) and downloaded there when online. The preprocessing that belongs
to the weights (resize, crop, mean/std) and their class names come with them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from reslab.config import FinetuneConfig, TrainConfig, build, load_config, to_dict
from reslab.data import Data, Preprocess, find_splits
from reslab.engine import TrainPolicy, read_checkpoint
from reslab.errors import ReslabError
from reslab.models import ResNet, create_model
from reslab.models.layers import NORM_TYPES, freeze_batchnorm
from reslab.weights import extract_state_dict, load_weights, read_file


@dataclass
class Pretrained:
    """Weights and what belongs to them."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    preprocess: Preprocess | None  # None: let the target data decide (a bare weights file)
    model_args: dict[str, Any]
    origin: str


def torchvision_weights(spec: str) -> Pretrained:
    """``resnet50.IMAGENET1K_V2`` -> torchvision's weights, from its cache or downloaded into it."""
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
    preprocess = Preprocess(
        (t.crop_size[0],) * 2,
        tuple(t.mean),
        tuple(t.std),
        3,
        t.resize_size[0],
        t.interpolation.value,
        tuple(weights.meta.get("categories") or ()),
    )
    return Pretrained(
        arch,
        extract_state_dict(read_file(cached), source=str(cached)),
        preprocess,
        {},
        f"torchvision:{arch}.{weights.name}",
    )


def load_source(source: str, model: str | None = None) -> Pretrained:
    """Pretrained weights from a reslab checkpoint, a weights file (``model`` names its
    architecture), torchvision (``torchvision:NAME.WEIGHTS``) or the Hugging Face Hub
    (``hf-hub:timm/resnet50.a1_in1k``, or a folder in its layout: ``local-dir:PATH``)."""
    if source.startswith("torchvision:"):
        return torchvision_weights(source.split(":", 1)[1])
    ckpt = read_checkpoint(source, model, device="cpu")
    return Pretrained(
        ckpt.arch,
        ckpt.model.state_dict(),
        ckpt.preprocess if ckpt.preprocess_known else None,  # reslab checkpoints and hub configs carry it
        ckpt.model_args,
        str(source),
    )


def finetune_config(
    source: str,
    data_dir: str,
    *,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
) -> tuple[TrainConfig, FinetunePolicy]:
    """The training config of a fine-tuning run (the ``finetune`` recipe, the source's architecture
    and preprocessing, a 20% validation split when the folder has none, then ``overrides``) and
    the policy that trains it, holding the source's weights (read once, here)."""
    ft = build(FinetuneConfig, {**(finetune or {}), "source": source})
    pre = load_source(source, model)
    tree = {"model": model or pre.arch, "data.dir": data_dir, **(overrides or {})}
    if pre.preprocess:  # the weights' own preprocessing: nobody retypes ImageNet's mean/std
        tree.setdefault("data.image_size", pre.preprocess.crop)
        tree.setdefault("data.resize", pre.preprocess.resize or pre.preprocess.crop)
        tree.setdefault("data.mean", list(pre.preprocess.mean))
        tree.setdefault("data.std", list(pre.preprocess.std))
    if "data.val_split" not in tree and find_splits(Path(data_dir))[1] is None:
        tree["data.val_split"] = 0.2
    cfg = load_config("finetune", tree)
    late = [e for e in ft.unfreeze_at if cfg.epochs is not None and int(e.split(":")[0]) >= cfg.epochs]
    if late:
        raise ReslabError(
            f"--unfreeze-at {' '.join(late)}: the run has {cfg.epochs:g} epochs (0-based epochs 0..{math.ceil(cfg.epochs) - 1}), "
            "so it would never unfreeze; use an earlier epoch or more --epochs"
        )
    return cfg, FinetunePolicy(ft, pre)


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


def parse_freeze(spec: str, stages: int) -> int:
    """How many stages (after the stem) a freeze spec freezes; ``base`` freezes them all, ``none`` -1."""
    if spec == "none":
        return -1
    if spec == "base":
        return stages
    n = int(re.fullmatch(r"stages:(\d+)", spec).group(1))
    if n > stages:
        raise ReslabError(
            f"--freeze {spec!r}: this model has {stages} stages; use stages:N with N <= {stages}"
        )
    return n


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


class Freezer:
    """Which parts of a fine-tuned network train at each epoch: the head always; the stem and the
    first stages as ``freeze`` says until an ``unfreeze_at`` event releases the last N stages."""

    def __init__(self, model: ResNet, ft: FinetuneConfig) -> None:
        self.model, self.ft = model, ft
        self.n = len(model.stage_names)
        self.frozen_stages = parse_freeze(ft.freeze, self.n)
        self.events = parse_unfreeze(ft.unfreeze_at, self.n)
        self.first = len(model.parts())

    def trainable_from(self, epoch: int) -> int:
        """Index into ``model.parts()`` of the first trainable part at ``epoch`` (0-based)."""
        if self.frozen_stages < 0:
            return 0
        first = self.frozen_stages + 1  # stem + frozen stages are parts 0..frozen_stages
        for at, last_n in self.events:
            if epoch >= at:
                first = min(first, self.n + 1 - last_n)
        return first

    def apply(self, epoch: int) -> list[str]:
        """Set requires_grad for ``epoch``; returns the names of the trainable parts."""
        self.first = self.trainable_from(epoch)
        return self.model.set_trainable(self.first)

    def train_mode(self, model: nn.Module) -> None:
        """Training mode for the trained parts; frozen parts keep their BN statistics (eval mode)."""
        model.train()
        for _, modules in self.model.parts()[: self.first]:
            for module in modules:
                for m in module.modules():
                    if isinstance(m, NORM_TYPES):
                        m.eval()

    def param_groups(self, head_lr: float, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimizer group per part (the head at ``head_lr``, the rest at ``base_lr``), all from the
        start: unfreezing flips requires_grad, so a resumed run's optimizer state always fits."""
        groups = []
        for name, modules in self.model.parts():
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


class FinetunePolicy(TrainPolicy):
    """Training from pretrained weights: a new head, frozen parts, an unfreezing schedule.

    ``pretrained``: the source's weights when already read (:func:`finetune_config` reads them
    once); a resumed run needs none, its checkpoint holds the weights.
    """

    kind = "finetune"

    def __init__(self, ft: FinetuneConfig, pretrained: Pretrained | None = None) -> None:
        if not ft.source:
            raise ReslabError("fine-tuning needs a source: reslab finetune --from SOURCE")
        self.ft, self.pretrained = ft, pretrained
        self.freezer: Freezer | None = None
        self.started = False

    def build_model(self, cfg: TrainConfig, data: Data, model_args: dict[str, Any], fresh: bool) -> nn.Module:
        ft = self.ft
        if fresh:
            pre = self.pretrained or load_source(ft.source, cfg.model)
            net = create_model(cfg.model, in_chans=data.in_chans, **{**pre.model_args, **model_args})
            sd = dict(pre.state_dict)
            first = next(k for k, v in sd.items() if v.ndim >= 4)  # the stem's first conv
            sd[first] = adapt_first_conv(sd[first], data.in_chans, ft.in_chans_mode)
            load_weights(net, sd, ignore_head=True)
        else:  # resumed: the checkpoint's weights are loaded next
            net = create_model(cfg.model, in_chans=data.in_chans, **model_args)
        self.freezer = Freezer(net, ft)
        if ft.frozen_bn == "frozen":  # parts that stay frozen for the whole run
            for _, modules in net.parts()[: self.freezer.trainable_from(10**9)]:
                for module in modules:
                    freeze_batchnorm(module)
        return net

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
        head_lr = self.ft.head_lr or cfg.optim.lr
        return self.freezer.param_groups(head_lr, self.ft.base_lr or head_lr / 10, cfg.optim.weight_decay)

    def start_epoch(self, epoch: int, model: nn.Module) -> str | None:
        before = self.freezer.first if self.started else None
        trainable = self.freezer.apply(epoch)
        self.started = True
        return f"training {', '.join(trainable)}" if self.freezer.first != before else None

    def train_mode(self, model: nn.Module) -> None:
        self.freezer.train_mode(model)

    def config(self) -> dict[str, Any]:
        return to_dict(self.ft)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FinetunePolicy:
        return cls(build(FinetuneConfig, config))
