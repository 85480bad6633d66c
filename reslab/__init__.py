"""reslab: deep residual networks as data, with training, transfer, analysis and deployment.

The public names below are imported on first use (PEP 562), so that ``reslab --help`` and other
commands that need no model do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from reslab.errors import ReslabError

__version__ = "0.1.0"
_PUBLIC = {
    "ResNet": "reslab.models",
    "ResNetSpec": "reslab.models",
    "create_model": "reslab.models",
    "list_models": "reslab.models",
    "load_weights": "reslab.weights",
    "save_weights": "reslab.weights",
    "save_pretrained": "reslab.deploy.share",
}
__all__ = ["ReslabError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'reslab' has no attribute {name!r}")
