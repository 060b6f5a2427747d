"""Fused kernels for TimeSformer's divided space-time attention.

Public API: ``temporal_attention``, ``spatial_attention`` (the ops), the modules
``DividedTemporalAttention``, ``DividedSpatialAttention``, ``DividedSpaceTimeBlock``,
``patch``/``unpatch`` (swap the fused attention into an existing model), ``context_parallel``
(split a patched model's clips by frames over the ranks of a process group), ``info``.
"""
from ._version import __version__
from .info import info
from .integrations import patch, unpatch
from .integrations.context_parallel import context_parallel
from .modules import DividedSpaceTimeBlock, DividedSpatialAttention, DividedTemporalAttention
from .ops import spatial_attention, temporal_attention

__all__ = [
    "__version__", "info", "patch", "unpatch", "context_parallel", "temporal_attention", "spatial_attention",
    "DividedTemporalAttention", "DividedSpatialAttention", "DividedSpaceTimeBlock",
]
