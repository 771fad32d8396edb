"""ViT-ResNAS neural architecture search: search spaces, the weight-sharing super-network, MACs, evolution.

``linvision.nas.train`` (super-network training), ``linvision.nas.search`` (evolutionary search, latency) and
``linvision.nas.cli`` (the ``supernet train`` / ``search`` commands) are imported on demand.
"""
from .macs import analytic_macs, count_macs
from .space import SPACES, SearchSpace, get_space
from .supernet import ResNASSuperNet, masked_layer_norm

__all__ = ["analytic_macs", "count_macs", "SPACES", "SearchSpace", "get_space", "ResNASSuperNet",
           "masked_layer_norm"]
