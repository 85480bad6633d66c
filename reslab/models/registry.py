"""The model registry: names -> specs, and ``create_model``.

Strict on purpose: a duplicate name raises, an unknown name suggests close matches, and an
override that contradicts the named architecture raises instead of silently building another
network (timm's ``dict(model_args, **kwargs)`` lets a caller turn a resnet50 into something else).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reslab.errors import ReslabError
from reslab.hub import is_hub_name, locate
from reslab.models.resnet import ResNet
from reslab.models.spec import SPEC_FIELDS, ResNetSpec
from reslab.weights import load_weights


@dataclass(frozen=True)
class ModelEntry:
    name: str
    spec: ResNetSpec
    family: str
    paper: str  # where the architecture is defined


_REGISTRY: dict[str, ModelEntry] = {}
# Parametric families (e.g. wrn{depth}_{k}): a pattern and a function from its match to an entry.
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], ModelEntry]]] = []

# Build options that shape the model without changing its architecture.
BUILD_OPTIONS = tuple(p for p in inspect.signature(ResNet.__init__).parameters if p not in ("self", "spec"))
# Spec fields a user may choose: the paper's shortcut options on residual networks, and the
# dropout between a block's convs (Wide ResNets use 0.3 on CIFAR).
SELECTABLE = {"shortcut", "dropout"}


def register_model(name: str, spec: ResNetSpec, *, family: str, paper: str) -> ModelEntry:
    if name in _REGISTRY:
        raise ReslabError(f"model name {name!r} is already registered")
    entry = _REGISTRY[name] = ModelEntry(name, spec, family, paper)
    return entry


def register_pattern(pattern: str, make: Callable[[re.Match[str]], ModelEntry]) -> None:
    """Register a parametric family: names matching ``pattern`` are built by ``make``."""
    _PATTERNS.append((re.compile(pattern), make))


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, in natural order."""
    return sorted((n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)), key=_natural_key)


def families() -> list[str]:
    """Model families in the order they were registered (the paper's first)."""
    return list(dict.fromkeys(e.family for e in _REGISTRY.values()))


def get_model_entry(name: str) -> ModelEntry:
    """The entry of a registered name (matched case-insensitively, as ``RESNET50``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    lowered = name.lower()
    if lowered in _REGISTRY:
        return _REGISTRY[lowered]
    for regex, make in _PATTERNS:
        match = regex.fullmatch(lowered)
        if match:
            return make(match)
    close = difflib.get_close_matches(lowered, list(_REGISTRY), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    depth = re.fullmatch(r"(?:resnet|plain)(\d+)", lowered)
    if depth and (int(depth.group(1)) - 2) % 6 == 0:  # a CIFAR depth that is not registered
        registered = sorted(
            int(n[6:])
            for n in _REGISTRY
            if re.fullmatch(r"resnet\d+", n) and _REGISTRY[n].spec.stem == "cifar"
        )
        hint = (
            f": CIFAR ResNets have 6n+2 layers and are registered at {', '.join(map(str, registered))}; "
            f"build depth {depth.group(1)} with ResNet(ResNetSpec(depths=(n, n, n), ...))"
        )
    raise ReslabError(f"unknown model {name!r}{hint} (`reslab models` lists them all)")


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    pretrained: str | None = None,
    **overrides: Any,
) -> ResNet:
    """Build a registered network.

    ``num_classes`` defaults to the architecture's dataset (1000 for ImageNet nets, 10 for the
    CIFAR ones). ``overrides`` are build options (``zero_init_residual``, ``drop_path_rate``,
    ``output_stride``, ``norm_layer``, ...) or spec fields: ``shortcut`` may be chosen on any
    residual network; any other spec field must agree with the named architecture.

    ``pretrained`` loads weights: a file, ``hf-hub:ORG/NAME[@REVISION]`` (the Hugging Face Hub,
    e.g. ``hf-hub:timm/resnet50.a1_in1k``) or ``local-dir:PATH``; the classifier takes the
    weights' number of classes unless ``num_classes`` says otherwise (then only it is new).
    """
    entry = get_model_entry(name)
    new_head = num_classes is not None  # asked for: a head of its own, whatever the weights' classes
    if pretrained is not None and is_hub_name(pretrained):
        found = locate(pretrained)
        if get_model_entry(found.arch).name != entry.name:
            raise ReslabError(
                f"{pretrained} holds a {found.arch}, not a {entry.name}; build it with "
                f"create_model({found.arch!r}, pretrained={pretrained!r})"
            )
        args = dict(found.model_args)  # timm's build arguments, as the config records them
        if args.pop("global_pool", "avg") not in ("avg", ""):
            raise ReslabError(f"{pretrained}: pools otherwise than by averaging; reslab's ResNets average")
        in_chans = args.pop("in_chans", in_chans)
        num_classes = args.pop("num_classes", found.num_classes) if num_classes is None else num_classes
        overrides = {**args, **overrides}
        pretrained = str(found.weights)
    name, spec = entry.name, entry.spec
    changes, options = {}, {}
    for key, value in overrides.items():
        if key in SPEC_FIELDS:
            current = getattr(spec, key)
            value = tuple(value) if isinstance(current, tuple) else value
            if value == current:
                continue
            if key in SELECTABLE and (spec.residual or key != "shortcut"):
                changes[key] = value
            elif key == "shortcut":
                raise ReslabError(
                    f"{name} is a plain network (no shortcuts), so shortcut={value!r} contradicts it; "
                    f"use its residual twin ({name.replace('plain', 'resnet')}) instead"
                )
            else:
                raise ReslabError(
                    f"{key}={value!r} contradicts {name}, which is defined with {key}={current!r}; "
                    "build another architecture with reslab.models.ResNet(ResNetSpec(...))"
                )
        elif key in BUILD_OPTIONS:
            options[key] = value
        else:
            raise ReslabError(
                f"create_model({name!r}) got an unknown option {key!r}; "
                f"options: {', '.join(BUILD_OPTIONS)}, or a spec field to confirm"
            )
    model = ResNet(
        spec.replace(**changes) if changes else spec,
        num_classes=num_classes,
        in_chans=in_chans,
        features_only=features_only,
        out_indices=out_indices,
        **options,
    )
    model.name = name
    if pretrained is not None:
        report = load_weights(model, pretrained, strict=False)
        if report.missing or report.unexpected or report.mismatched or (report.head_skipped and not new_head):
            extra = "; pass num_classes for a new classifier" if report.head_skipped else ""
            raise ReslabError(f"{pretrained}: does not fit {name}: {report}{extra}")
    return model
