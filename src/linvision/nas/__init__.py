"""ViT-ResNAS neural architecture search: search spaces, the weight-sharing super-network, MACs, evolution."""
from .macs import analytic_macs, count_macs  # noqa: F401
from .space import SPACES, SearchSpace, get_space  # noqa: F401
from .supernet import ResNASSuperNet, masked_layer_norm  # noqa: F401
