from .linear import PackedLinear
from .retention import MultiScaleRetention
from .rwkv import ChannelMix, SpatialMix, q_shift
from .rwkv6 import ChannelMixV6, SpatialMixV6, q_shift_multihead

__all__ = ["PackedLinear", "MultiScaleRetention", "SpatialMix", "ChannelMix", "q_shift", "SpatialMixV6",
           "ChannelMixV6", "q_shift_multihead"]
