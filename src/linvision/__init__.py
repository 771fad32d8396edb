"""linvision: efficient vision backbones whose token mixing scales linearly with image size.

``import linvision`` registers every model with timm, so ``timm.create_model("vrwkv_tiny")`` works afterwards.
"""
from . import _compat  # noqa: F401  (must run before timm imports torchvision)
from . import models  # noqa: F401  (registers models with timm)
from .models import *  # noqa: F401,F403

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """The model of a linvision run folder (``model.safetensors`` + ``config.json``, or the weights file itself),
    in eval mode on ``device``: :func:`linvision.checkpoint.load_model` without the config. The same folder also
    loads through timm: ``timm.create_model("local-dir:RUN_DIR", pretrained=True)``.

    Raises:
        LinvisionError: missing/invalid files, unknown model, or weights that do not fit it.
    """
    from .checkpoint import load_model
    return load_model(run_dir, device)[0]
