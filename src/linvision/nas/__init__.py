"""ViT-ResNAS neural architecture search: search spaces, the weight-sharing super-network, MACs, evolution."""
from .macs import analytic_macs, count_macs  # noqa: F401
