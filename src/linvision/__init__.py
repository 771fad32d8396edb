"""linvision: efficient vision backbones whose token mixing scales linearly with image size.

``import linvision`` registers every model with timm, so ``timm.create_model("vrwkv_tiny")`` works afterwards.
"""
from . import _compat  # noqa: F401  (must run before timm imports torchvision)
from . import models  # noqa: F401  (registers models with timm)
from .models import *  # noqa: F401,F403

__version__ = "0.1.0"
