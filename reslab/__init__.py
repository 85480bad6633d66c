"""reslab: deep residual networks as data, with training, transfer, analysis and deployment."""

from reslab.errors import ReslabError
from reslab.models import ResNet, ResNetSpec, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ResNet", "ResNetSpec", "ReslabError", "__version__", "create_model", "list_models"]
