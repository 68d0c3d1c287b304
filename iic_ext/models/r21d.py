"""R(2+1)D in the layout of the IIC / VCOP ``models/r21d.py``.

Each 3D convolution is factored into a spatial ``1 x k x k`` conv (``spatial_conv``), BN (``bn``),
ReLU and a temporal ``k x 1 x 1`` conv (``temporal_conv``), with the intermediate width chosen so the
parameter count matches the full 3D convolution (Tran et al., CVPR 2018, section 3.5).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.utils import _triple

from .r3d import VideoResNet

__all__ = ["SpatioTemporalConv2Plus1D", "R2Plus1DNet", "intermediate_channels"]


def intermediate_channels(in_channels: int, out_channels: int, kernel_size) -> int:
    """floor(t*h*w*in*out / (h*w*in + t*out)), the width between the spatial and temporal convs."""
    t, h, w = _triple(kernel_size)
    return (t * h * w * in_channels * out_channels) // (h * w * in_channels + t * out_channels)


class SpatioTemporalConv2Plus1D(nn.Module):
    """Factored (2+1)D convolution without bias: spatial conv -> BN -> ReLU -> temporal conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = False):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        pt, ph, pw = _triple(padding)
        mid = intermediate_channels(in_channels, out_channels, (kt, kh, kw))
        self.spatial_conv = nn.Conv3d(in_channels, mid, (1, kh, kw), stride=(1, sh, sw),
                                      padding=(0, ph, pw), bias=bias)
        self.bn = nn.BatchNorm3d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.temporal_conv = nn.Conv3d(mid, out_channels, (kt, 1, 1), stride=(st, 1, 1),
                                       padding=(pt, 0, 0), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_conv(self.relu(self.bn(self.spatial_conv(x))))


class R2Plus1DNet(VideoResNet):
    """R(2+1)D: the residual network of :class:`~iic_ext.models.r3d.VideoResNet` with factored convs."""

    def __init__(self, layer_sizes: Sequence[int] = (1, 1, 1, 1), with_classifier: bool = False,
                 return_conv: bool = False, num_classes: int = 101, in_channels: int = 3):
        super().__init__(layer_sizes, with_classifier=with_classifier, return_conv=return_conv,
                         num_classes=num_classes, in_channels=in_channels, conv=SpatioTemporalConv2Plus1D)
