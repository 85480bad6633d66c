"""Weights by name: ``hf-hub:ORG/NAME[@REVISION]`` on the Hugging Face Hub and ``local-dir:PATH``, in
the layout timm reads and writes (``config.json`` + ``model.safetensors``).

Downloading, caching, revisions and offline mode are huggingface_hub's own (``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``, ``HF_TOKEN``); this module finds the files and reads the
config, the way timm parses it, and turns every failure into one line naming the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError

HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def is_hub_name(source: object) -> bool:
    """Whether ``source`` names weights on the Hub or in a folder of the Hub's layout."""
    return isinstance(source, str) and source.startswith((HF_HUB, LOCAL_DIR))


@dataclass(frozen=True)
class HubWeights:
    """A model's files and what its config says: the architecture, the classes and the
    preprocessing of the weights (timm's ``pretrained_cfg``)."""

    origin: str
    weights: Path
    arch: str
    num_classes: int | None
    pretrained_cfg: dict[str, Any]
    model_args: dict[str, Any]
    label_names: list[str] | None


def split_revision(repo: str) -> tuple[str, str | None]:
    """``ORG/NAME@REVISION`` -> (``ORG/NAME``, ``REVISION``), as timm splits it."""
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def locate(source: str) -> HubWeights:
    """Find (download into huggingface_hub's cache, when needed) a model's config and weights."""
    if source.startswith(LOCAL_DIR):
        folder = Path(source[len(LOCAL_DIR) :]).expanduser()
        if not folder.is_dir():
            raise ReslabError(f"{source}: no such folder")
        config = folder / "config.json"
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if not config.is_file() or weights is None:
            raise ReslabError(
                f"{source}: not a model folder (it needs config.json and {WEIGHT_FILES[0]}, as "
                "reslab.save_pretrained and timm write them)"
            )
        return _parse(source, json.loads(config.read_text()), weights)
    repo_id, revision = split_revision(source[len(HF_HUB) :])
    config = _download(source, repo_id, "config.json", revision)
    weights = None
    for name in WEIGHT_FILES:
        try:
            weights = _download(source, repo_id, name, revision)
            break
        except _Missing:
            continue
    if weights is None:
        raise ReslabError(f"{source}: the repository has no {' or '.join(WEIGHT_FILES[:2])}")
    return _parse(source, json.loads(config.read_text()), weights)


class _Missing(Exception):
    """A file the repository does not have (another weights file name may be tried)."""


def _download(source: str, repo_id: str, filename: str, revision: str | None) -> Path:
    """One file from the Hub through huggingface_hub's cache, or one line saying what to do."""
    from huggingface_hub import errors, hf_hub_download  # the Hub client: only for hf-hub: names

    with hub_errors(source, revision):
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except errors.LocalEntryNotFoundError:
            raise  # not missing on the Hub: not in the cache and no way to ask (said by hub_errors)
        except errors.EntryNotFoundError:
            if filename == "config.json":
                raise ReslabError(
                    f"{source}: the repository has no config.json (not a timm/reslab model repository)"
                ) from None
            raise _Missing(filename) from None


@contextlib.contextmanager
def hub_errors(source: str, revision: str | None = None) -> Iterator[None]:
    """huggingface_hub's failures (downloads and uploads alike) as one line naming the fix."""
    from huggingface_hub import errors as hub

    try:
        yield
    except hub.GatedRepoError:
        raise ReslabError(
            f"{source}: a gated repository; accept its terms on huggingface.co, then log in "
            "(hf auth login, or set HF_TOKEN)"
        ) from None
    except hub.RepositoryNotFoundError:
        raise ReslabError(
            f"{source}: no such repository on the Hub, or a private one and no token was given "
            "(hf auth login, or set HF_TOKEN)"
        ) from None
    except hub.RevisionNotFoundError:
        raise ReslabError(f"{source}: the repository has no revision {revision!r}") from None
    except hub.LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ReslabError(
            f"{source}: not in the local cache ({os.environ.get('HF_HUB_CACHE') or 'HF_HOME'}) "
            f"and {why}; download it once while online"
        ) from None
    except hub.LocalTokenNotFoundError:
        raise ReslabError(
            f"{source}: the Hub needs a token with write access here (hf auth login, or set HF_TOKEN)"
        ) from None
    except hub.HFValidationError as e:
        raise ReslabError(f"{source}: not a repository name ({str(e).splitlines()[0]})") from None
    except hub.HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
            raise ReslabError(
                f"{source}: the Hub refused this token ({str(e).splitlines()[0]}); log in with write access "
                "(hf auth login, or set HF_TOKEN)"
            ) from None
        raise ReslabError(f"{source}: the Hub answered {str(e).splitlines()[0]}") from None
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("httpx", "httpcore", "requests", "urllib3"):
            raise
        raise ReslabError(
            f"{source}: the Hub cannot be reached ({type(e).__name__}); check the network"
        ) from None


def _parse(origin: str, cfg: dict[str, Any], weights: Path) -> HubWeights:
    """timm's config.json: ``architecture``, ``num_classes``, ``label_names``, ``model_args`` and
    ``pretrained_cfg`` (older files kept everything in one dict)."""
    cfg = dict(cfg)
    pretrained = dict(cfg.get("pretrained_cfg", cfg))
    arch = cfg.get("architecture") or pretrained.get("architecture")
    if not arch:
        raise ReslabError(f"{origin}: config.json names no architecture")
    labels = cfg.get("label_names", pretrained.get("label_names", pretrained.get("labels")))
    if isinstance(labels, dict):  # id -> name, possibly with gaps
        labels = [labels[k] for k in sorted(labels, key=int)]
    num_classes = cfg.get("num_classes", pretrained.get("num_classes"))
    return HubWeights(
        origin, weights, arch, num_classes, pretrained, dict(cfg.get("model_args") or {}), labels
    )
