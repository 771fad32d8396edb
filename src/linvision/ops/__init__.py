"""Token-mixing ops: a plain reference beside each fast form, same signature."""
from .biwkv import bi_wkv, bi_wkv_ref
from .retention import decay_gammas, retention_chunkwise, retention_parallel, retention_recurrent, retention_ref

__all__ = ["bi_wkv", "bi_wkv_ref", "retention_ref", "retention_parallel", "retention_recurrent", "retention_chunkwise",
           "decay_gammas"]
