"""iic_ext operators: fused kernels behind thin wrappers (shapes in each docstring).

The pure-PyTorch twin of every op is in :mod:`iic_ext.ops.reference`.
"""
from . import indices, reference
from ._library import HAS_C, unchecked_indices
from .nce import bank_scores, bank_update_, empty_bank, iic_scores, iic_softmax_loss
from .indices import permute_index, repeat_index, reverse_index, shuffle_index, swap_index
from .views import iic_views, repeat_negative, residual_frames, shuffle_negative, swap_time_index, temporal_gather

__all__ = [
    "HAS_C",
    "unchecked_indices",
    "indices",
    "reference",
    "residual_frames",
    "temporal_gather",
    "repeat_negative",
    "shuffle_negative",
    "swap_time_index",
    "iic_views",
    "repeat_index",
    "shuffle_index",
    "swap_index",
    "permute_index",
    "reverse_index",
    "bank_scores",
    "iic_scores",
    "iic_softmax_loss",
    "bank_update_",
    "empty_bank",
]
