"""Residual networks built from one spec and one residual wiring."""

from reslab.models import zoo as _zoo  # noqa: F401  (registers the named architectures)
from reslab.models.registry import ModelEntry, create_model, get_model_entry, list_models, register_model
from reslab.models.resnet import ResidualBlock, ResNet
from reslab.models.spec import ResNetSpec

__all__ = [
    "ModelEntry",
    "ResNet",
    "ResNetSpec",
    "ResidualBlock",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
]
