"""Sharing trained models the way timm users already do: a folder in the Hub's layout, and a push.

:func:`save_pretrained` writes ``model.safetensors``, ``config.json`` (``architecture``,
``num_classes``, ``num_features``, ``label_names``, ``model_args``, ``pretrained_cfg``: timm's
fields) and a model card ``README.md`` (YAML front matter for the Hub; the run's facts when it
comes from a run: recipe, data, test error, curves, parameters, multiply-adds, the command). For
every architecture of timm's ResNet module the folder loads with
``timm.create_model("local-dir:DIR", pretrained=True)``; every reslab model loads with
``reslab.create_model(NAME, pretrained="local-dir:DIR")``. :func:`push` builds that folder and
hands it to :func:`upload`, the one function that needs a network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from reslab.complexity import count_macs, count_params
from reslab.data import Preprocess, default_preprocess, to_pretrained_cfg
from reslab.engine import read_checkpoint
from reslab.engine.checkpoint import LAST
from reslab.errors import ReslabError
from reslab.hub import HF_HUB, hub_errors, split_revision
from reslab.models import get_model_entry
from reslab.weights import atomic_save, file_kind, publish

# Public datasets the Hub knows by these names (for the card's front matter).
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "mnist": "ylecun/mnist"}


def is_timm_architecture(name: str) -> bool:
    """Whether timm builds ``name`` with reslab's state dict (its ResNet module's models), as far as
    the timm installed here says (without timm: no)."""
    try:
        import timm  # optional for users: only to say which folders timm loads too
    except ImportError:
        return False
    return name in timm.list_models(module="resnet")


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    preprocess: Preprocess | None = None,
    classes: list[str] | None = None,
    run: Path | None = None,
    license: str = "apache-2.0",
    repo: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a reslab ResNet) to ``folder`` in the Hub's layout, with its preprocessing
    (default: the architecture's) and class names; ``run``: the run directory it came from, whose
    facts go into the card. The folder is built beside ``folder`` and moved into place; a folder
    holding something else is refused unless ``overwrite``."""
    folder = Path(folder)
    ours = (folder / "config.json").exists()  # an earlier save: replaced
    if (
        folder.exists()
        and not overwrite
        and not ours
        and file_kind(folder) == "folder"
        and any(folder.iterdir())
    ):
        raise ReslabError(f"{folder} is a folder of other files; choose another folder or pass --overwrite")
    name = getattr(model, "name", None)
    if name is None:
        raise ReslabError(
            "save_pretrained takes a model built by reslab.create_model (it names its architecture)"
        )
    pre = preprocess or default_preprocess(name, model.in_chans)
    classes = list(classes or pre.classes or [str(i) for i in range(model.num_classes)])
    if len(classes) != model.num_classes:
        raise ReslabError(f"{len(classes)} class names for a model of {model.num_classes} classes")
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent if folder.parent.exists() else None)
    )
    try:
        atomic_save(model.state_dict(), tmp / "model.safetensors")
        config = _config(model, name, pre, classes, license)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        facts = _run_facts(run, tmp) if run is not None else {}
        (tmp / "README.md").write_text(_card(model, name, pre, config, facts, license, repo or "ORG/NAME"))
        folder.parent.mkdir(parents=True, exist_ok=True)
        publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _config(model: nn.Module, name: str, pre: Preprocess, classes: list[str], license: str) -> dict[str, Any]:
    """timm's config.json fields. For timm's architectures the build arguments are the ones timm
    takes (classes, channels); for reslab's own, reslab's options that differ from the spec."""
    args: dict[str, Any] = {"num_classes": model.num_classes, "in_chans": model.in_chans}
    entry = get_model_entry(name)
    if model.spec != entry.spec:  # e.g. another shortcut option
        changed = {
            k: getattr(model.spec, k)
            for k in ("shortcut",)
            if getattr(model.spec, k) != getattr(entry.spec, k)
        }
        args.update(changed)
    pretrained_cfg = {
        **to_pretrained_cfg(pre),
        "num_classes": model.num_classes,
        "first_conv": "conv1" if hasattr(model, "conv1") else model.stem_names[0],
        "classifier": "fc",
        "fixed_input_size": False,
        "license": license,
    }
    return {
        "architecture": name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "label_names": classes,
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
    }


def _run_facts(run: Path, folder: Path) -> dict[str, Any]:
    """What the run directory says about how the model was made; its curves are copied."""
    facts: dict[str, Any] = {}
    summary = run / "summary.json"
    if summary.exists():
        facts["summary"] = json.loads(summary.read_text())
    config = run / "config.yaml"
    if config.exists():
        facts["config"] = yaml.safe_load(config.read_text())
    command = run / "command.txt"
    if command.exists():
        first = command.read_text().splitlines()[0]
        facts["command"] = first.split("  ", 1)[1] if "  " in first else first
    curves = run / "curves.png"
    if curves.exists():
        shutil.copy(curves, folder / "curves.png")
        facts["curves"] = "curves.png"
    return facts


def _card(
    model: nn.Module, name: str, pre: Preprocess, config: dict, facts: dict, license: str, repo: str
) -> str:
    timm_ok = is_timm_architecture(name)
    summary, cfg = facts.get("summary", {}), facts.get("config", {})
    data = (cfg.get("data") or {}).get("name") or summary.get("data")
    front = {
        "tags": ["image-classification", "resnet", "reslab", *(["timm"] if timm_ok else [])],
        "library_name": "timm" if timm_ok else "reslab",
        "license": license,
        **({"datasets": [HUB_DATASETS[data]]} if data in HUB_DATASETS else {}),
    }
    params, macs = count_params(model), count_macs(model, (1, pre.channels, *pre.size))
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{get_model_entry(name).paper}. {params / 1e6:.2f}M parameters, {macs / 1e9:.3f} GMACs "
        f"(multiply-adds) per {'x'.join(map(str, pre.size))} image, {model.num_classes} classes.",
        "",
    ]
    if summary:
        err = summary.get("eval_err")
        lines += [
            "## How it was trained",
            "",
            f"- data: {data} ({summary.get('eval_split', 'test')} error {100 * err:.2f}% after "
            f"{summary.get('iterations')} iterations)"
            if err is not None
            else f"- data: {data}",
            f"- recipe: {cfg.get('optim', {}).get('name', '?')} lr {cfg.get('optim', {}).get('lr', '?')}, "
            f"batch {cfg.get('data', {}).get('batch_size', '?')}, schedule {cfg.get('sched', {}).get('name', '?')}, "
            f"{summary.get('epochs')} epochs",
            f"- device: {summary.get('settings', {}).get('device_name', summary.get('device', '?'))}, "
            f"{summary.get('train_seconds', 0) / 60:.1f} min of training",
        ]
        if "command" in facts:
            lines.append(f"- command: `{facts['command']}`")
        lines.append("")
        if "curves" in facts:
            lines += ["![training curves](curves.png)", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import reslab",
        f'model = reslab.create_model("{name}", pretrained="hf-hub:{repo}")  # or "local-dir:FOLDER"',
        "```",
        "",
    ]
    if timm_ok:
        lines += [
            "```python",
            "import timm",
            'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)',
            "```",
            "",
        ]
    lines += [
        f"Inputs: {pre.channels}-channel images, the shorter side resized to {pre.resize}, the central "
        f"{'x'.join(map(str, pre.size))} crop, normalised with mean {list(pre.mean)} and std {list(pre.std)} "
        "(`pretrained_cfg` in config.json)."
        if pre.resize
        else f"Inputs: {pre.channels}-channel images resized to {'x'.join(map(str, pre.size))}, normalised with "
        f"mean {[round(m, 4) for m in pre.mean]} and std {[round(s, 4) for s in pre.std]}.",
        "",
    ]
    return "\n".join(lines)


def pretrained_folder(source: str | os.PathLike, folder: str | os.PathLike, **kwargs: Any) -> Path:
    """A run directory (its ``last.pt``) or a checkpoint, as :func:`save_pretrained` writes it."""
    path = Path(source)
    run = path if path.is_dir() else path.parent
    ckpt = read_checkpoint(path / LAST if path.is_dir() else path, device="cpu")
    model = ckpt.model
    model.name = get_model_entry(ckpt.arch).name
    has_run = (run / "summary.json").exists()
    return save_pretrained(
        model,
        folder,
        preprocess=ckpt.preprocess,
        classes=ckpt.classes,
        run=run if has_run else None,
        **kwargs,
    )


def check_remote_architecture(repo: str, arch: str) -> None:
    """An existing repository holding another architecture is not pushed over."""
    from huggingface_hub import errors, hf_hub_download

    repo_id, revision = split_revision(repo)
    with hub_errors(HF_HUB + repo, revision):
        try:
            remote = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        except (errors.EntryNotFoundError, errors.RepositoryNotFoundError):
            return  # a new repository (or one without a model yet): nothing to contradict
    held = remote.get("architecture") or (remote.get("pretrained_cfg") or {}).get("architecture")
    if held and held != arch:
        raise ReslabError(
            f"{repo} holds a {held} (its config.json); this is a {arch}: push it to another repository"
        )


def upload(folder: Path, repo: str, *, private: bool = False, revision: str | None = None) -> str:
    """The one call that needs a network: create the repository if needed and upload ``folder``.
    The token is huggingface_hub's (``hf auth login`` or ``HF_TOKEN``). Returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(HF_HUB + repo, revision):
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo, revision=revision, commit_message="Upload a reslab model"
        )
    return str(getattr(info, "commit_url", info))


def push(
    source: str | os.PathLike,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    license: str = "apache-2.0",
    local_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Share a run (or a checkpoint) on the Hub as ``repo``; with ``local_dir`` write the folder
    there instead and upload nothing."""
    if "/" not in repo:
        raise ReslabError(
            f"--repo {repo!r}: a Hub repository is ORG/NAME (your user name or an organisation)"
        )
    if local_dir is not None:
        folder = pretrained_folder(source, local_dir, license=license, repo=repo)
        return {"folder": str(folder), "uploaded": False}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pretrained_folder(source, Path(tmp) / "model", license=license, repo=repo.partition("@")[0])
        arch = json.loads((folder / "config.json").read_text())["architecture"]
        check_remote_architecture(f"{repo}@{revision}" if revision else repo, arch)
        url = upload(folder, repo, private=private, revision=revision)
    return {"repo": repo, "uploaded": True, "url": url}
