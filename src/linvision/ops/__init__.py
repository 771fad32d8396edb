"""Token-mixing ops: a plain reference beside each fast form, same signature."""
from . import biwkv_triton_op  # noqa: F401  (registers linvision::bi_wkv_triton_*; imports no Triton)
from .biwkv import BI_WKV_VARIANTS, bi_wkv, bi_wkv_official_kernel_ref, bi_wkv_ref
from .qshift import q_shift_lerp, q_shift_ref
from .wkv6 import wkv6, wkv6_loop_free, wkv6_ref
from .retention import decay_gammas, retention_chunkwise, retention_parallel, retention_recurrent, retention_ref

__all__ = ["bi_wkv", "bi_wkv_ref", "bi_wkv_official_kernel_ref", "BI_WKV_VARIANTS", "retention_ref",
           "retention_parallel", "retention_recurrent", "retention_chunkwise", "decay_gammas", "wkv6", "wkv6_ref",
           "wkv6_loop_free", "q_shift_lerp", "q_shift_ref"]
