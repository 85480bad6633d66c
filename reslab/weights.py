"""Reading and writing weights: reslab's own checkpoints, torchvision, timm and common training scripts.

Files are read with ``torch.load(weights_only=True)`` or safetensors: tensors and plain data
only, never pickled code. Every failure names the file and what to do about it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reslab.errors import ReslabError
from reslab.hub import is_hub_name, locate

# Containers that training scripts wrap a state dict in, most specific first.
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")
# Prefixes added by wrappers: DataParallel/DDP, torch.compile, Lightning-style "self.model".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Classifier names used by other code bases for what torchvision (and reslab) call ``fc``.
_HEAD_ALIASES = ("linear.", "classifier.", "head.fc.", "head.")
# Other names of reslab's (torchvision's) modules inside blocks: the common CIFAR training scripts
# ("kuangliu" pytorch-cifar) call the projection shortcut ``shortcut``.
_BLOCK_ALIASES = ((".shortcut.", ".downsample."),)
_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt", ".tar", ".safetensors")


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether a path names weights (a file by its suffix, or ``hf-hub:``/``local-dir:``), as
    opposed to an image or a folder."""
    return is_hub_name(path) or Path(path).suffix.lower() in _SUFFIXES


@dataclass
class LoadReport:
    """What :func:`load_weights` did: keys it loaded, skipped and could not fill."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape"
    head_skipped: bool = False

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.head_skipped:
            parts.append("kept the model's own classifier")
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} ({_preview(keys)})")
        return "; ".join(parts)


def _preview(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw object stored in a checkpoint file, read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ReslabError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ReslabError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] not in (b"PK", b"\x80\x02") and head[:1] != b"\x80":  # zip archive, or a legacy pickle
        raise ReslabError(
            f"{path}: not a checkpoint (neither a PyTorch file nor safetensors); check the path, or "
            "re-save the weights with torch.save(model.state_dict(), path)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head[:2] == b"PK")
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise ReslabError(
                f"{path}: holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
                "which reslab will not unpickle; re-save it with torch.save(model.state_dict(), path)"
            ) from None
        raise ReslabError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {_load_error(e)}"
        ) from None
    except Exception as e:  # the unpickler raises anything from EOFError to IndexError on junk
        raise ReslabError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {_load_error(e)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ReslabError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    return dict(obj)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_error(e: BaseException) -> str:
    """The part of a loader's error that says what is wrong, without torch's advice paragraphs."""
    return _first_line(e).split(". ")[0]


def extract_state_dict(obj: Mapping[str, Any], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap the state dict from the containers and prefixes that training scripts add."""
    sd: Any = obj
    while isinstance(sd, Mapping) and not _is_state_dict(sd):
        inner = next((sd[k] for k in _CONTAINER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            raise ReslabError(
                f"{source}: no state dict found (top-level keys: {_preview(sorted(map(str, sd)), 6)}); "
                f"expected tensors or one of {', '.join(_CONTAINER_KEYS)}"
            )
        sd = inner
    sd = dict(sd)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _is_state_dict(d: Mapping[str, Any]) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _rename_blocks(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    for alias, name in _BLOCK_ALIASES:
        if any(alias in k for k in sd) and not any(alias in k for k in model_keys):
            sd = {k.replace(alias, name): v for k, v in sd.items()}
    return sd


def _rename_head(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    if any(k.startswith("fc.") for k in sd) or not any(k.startswith("fc.") for k in model_keys):
        return sd
    for alias in _HEAD_ALIASES:
        if f"{alias}weight" in sd:
            return {("fc." + k[len(alias) :] if k.startswith(alias) else k): v for k, v in sd.items()}
    return sd


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    ignore_head: bool = False,
) -> LoadReport:
    """Load ``source`` (a file path or a state dict / checkpoint dict) into ``model``.

    ``source`` may also name weights on the Hugging Face Hub (``hf-hub:timm/resnet50.a1_in1k``) or
    a folder in its layout (``local-dir:PATH``). Understands reslab checkpoints, torchvision and
    timm state dicts, and checkpoints from common
    training scripts (a dict holding ``state_dict`` or ``model``, DataParallel's ``module.`` prefix,
    a head called ``linear``, shortcuts called ``shortcut``). When only the classifier differs, says so; ``ignore_head=True`` (or
    ``strict=False``) then loads everything else. ``strict=False`` also skips missing, unexpected
    and mismatched keys, and the returned report lists them.
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    if is_hub_name(source):  # hf-hub:ORG/NAME or local-dir:PATH
        source = locate(source).weights
    obj = read_file(source) if isinstance(source, (str, os.PathLike)) else source
    sd = extract_state_dict(obj, source=name)
    own = model.state_dict()
    sd = _rename_head(_rename_blocks(sd, set(own)), set(own))
    head = {"fc.weight", "fc.bias"}
    if not head & set(own):  # a headless model (num_classes=0, features_only) takes no classifier
        sd = {k: v for k, v in sd.items() if k not in head}
    # Frozen BatchNorm keeps no step counter: the checkpoint's counters have nowhere to go and mean nothing.
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith("num_batches_tracked")}
    report = _compare(sd, own)
    head_only = bool(report.mismatched) and {m.split(":")[0] for m in report.mismatched} <= head
    head_only = head_only and not report.missing and not report.unexpected
    if head_only and strict and not ignore_head:
        raise ReslabError(
            f"{name}: only the classifier differs (checkpoint {sd['fc.weight'].shape[0]} classes, "
            f"model {own['fc.weight'].shape[0]}); pass ignore_head=True (or strict=False) to load the rest"
        )
    if ignore_head or head_only:
        sd = {k: v for k, v in sd.items() if k not in head}
        report = _compare(sd, {k: v for k, v in own.items() if k not in head})
        report.head_skipped = True
    if strict and (report.missing or report.unexpected or report.mismatched):
        label = getattr(model, "name", type(model).__name__)
        raise ReslabError(f"{name}: does not fit model {label}: {report}")
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(sd, strict=False)
    report.loaded = len(sd)
    return report


def _compare(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> LoadReport:
    shared = sorted(k for k in sd if k in own and own[k].shape != sd[k].shape)
    return LoadReport(  # a missing BN step counter (e.g. from FrozenBatchNorm2d) is harmless
        missing=sorted(k for k in set(own) - set(sd) if not k.endswith("num_batches_tracked")),
        unexpected=sorted(set(sd) - set(own)),
        mismatched=[f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shared],
    )


def file_kind(path: str | os.PathLike) -> str:
    """What a file holds, read from its first bytes (not its name): a PyTorch checkpoint, a
    TorchScript module, a torch.export program, safetensors weights, an ONNX model, ..."""
    path = Path(path)
    if path.is_dir():
        if (path / "Manifest.json").exists():
            return "Core ML package"
        return "reslab bundle" if (path / "bundle.json").exists() else "folder"
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"PK":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any("/code/" in n for n in names):
            return "TorchScript module"
        if any(n.endswith(("/archive_format", "/models/model.json")) for n in names):
            return "torch.export program"
        return "PyTorch checkpoint" if any(n.endswith("data.pkl") for n in names) else "zip archive"
    if head[:1] == b"\x80":
        return "PyTorch checkpoint"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "safetensors weights"
    if head[:6] == b"\x93NUMPY":
        return "NumPy array"
    if head[4:8] == b"ET12":
        return "ExecuTorch program"
    if head[:1] == b"\x08" and (path.suffix == ".onnx" or b"pytorch" in head or b"onnx" in head):
        return "ONNX model"  # a protobuf whose first field is the IR version
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON"
    return f"{path.suffix or 'other'} file"


def guard_output(path: str | os.PathLike, kind: str, *, inputs: tuple = (), overwrite: bool = False) -> Path:
    """``path``, checked before a command writes a ``kind`` file there: never one of the command's
    own ``inputs``; never over an existing file of another kind (a checkpoint is not replaced by an
    export) unless ``overwrite`` says so. Re-running a command over its own earlier output is fine."""
    path = Path(path)
    for given in inputs:
        if given is not None and path.exists() and Path(given).exists() and path.samefile(given):
            raise ReslabError(f"{path} is an input of this command; write the output elsewhere (--out)")
    if path.exists() and not overwrite:
        held = file_kind(path)
        if held != kind:
            raise ReslabError(
                f"{path} holds a {held}, not a {kind}; choose another --out, or pass --overwrite to replace it"
            )
    return path


def publish(tmp: Path, path: Path) -> None:
    """Move a finished file or folder built at ``tmp`` into place at ``path``; an earlier one there
    is replaced (a folder is swapped in: renamed aside, the new one renamed in, the old removed)."""
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write with ``torch.save`` (or safetensors for ``.safetensors``) to a temp file, then rename.

    A crash mid-write leaves the previous file intact: readers see the old file or the new one,
    never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            tensors = {k: v.detach().contiguous() for k, v in obj.items()}
            save_file(tensors, str(tmp))
        else:
            torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_weights(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Save a model's weights (``.safetensors`` or a torch file with ``meta``) atomically."""
    sd = model.state_dict()
    if Path(path).suffix == ".safetensors":
        return atomic_save(sd, path)
    return atomic_save({"model": sd, "arch": getattr(model, "name", None), **meta}, path)
