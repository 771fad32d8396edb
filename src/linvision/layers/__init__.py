from .retention import MultiScaleRetention
from .rwkv import ChannelMix, SpatialMix, q_shift

__all__ = ["MultiScaleRetention", "SpatialMix", "ChannelMix", "q_shift"]
