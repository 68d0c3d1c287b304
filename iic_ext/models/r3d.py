"""3D ResNets (R3D-10, R3D-18) in the layout of the IIC / VCOP ``models/r3d.py``.

Module names (``conv1.temporal_spatial_conv``, ``bn1``, ``conv2.block1.conv1...``,
``conv3.block1.downsampleconv``, ``conv3.block1.downsamplebn``, ``conv2.blocks.0...``, ``linear``)
match the original so that its checkpoints load with ``strict=True``. The residual network body is
shared with R(2+1)D (``r21d.py``); only the convolution type differs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.utils import _triple

__all__ = ["SpatioTemporalConv", "SpatioTemporalResBlock", "SpatioTemporalResLayer", "VideoResNet",
           "R3DNet"]


class SpatioTemporalConv(nn.Module):
    """Full 3D convolution (no bias), wrapped so the parameter is ``temporal_spatial_conv.weight``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = False):
        super().__init__()
        self.temporal_spatial_conv = nn.Conv3d(in_channels, out_channels, _triple(kernel_size),
                                               stride=_triple(stride), padding=_triple(padding), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_spatial_conv(x)


ConvFactory = Callable[..., nn.Module]


class SpatioTemporalResBlock(nn.Module):
    """Basic residual block: conv-BN-ReLU-conv-BN, plus identity or a strided 1x1x1 conv-BN shortcut.

    With ``downsample`` the first conv and the shortcut use stride 2 in time and space.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 conv: ConvFactory = SpatioTemporalConv):
        super().__init__()
        self.downsample = downsample
        padding = kernel_size // 2
        if downsample:
            self.downsampleconv = conv(in_channels, out_channels, 1, stride=2)
            self.downsamplebn = nn.BatchNorm3d(out_channels)
            self.conv1 = conv(in_channels, out_channels, kernel_size, padding=padding, stride=2)
        else:
            self.conv1 = conv(in_channels, out_channels, kernel_size, padding=padding)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv(out_channels, out_channels, kernel_size, padding=padding)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.outrelu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.relu1(self.bn1(self.conv1(x)))
        res = self.bn2(self.conv2(res))
        if self.downsample:
            x = self.downsamplebn(self.downsampleconv(x))
        return self.outrelu(x + res)


class SpatioTemporalResLayer(nn.Module):
    """``block1`` (optionally downsampling) followed by ``blocks`` (``layer_size - 1`` more blocks)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, layer_size: int,
                 downsample: bool = False, conv: ConvFactory = SpatioTemporalConv):
        super().__init__()
        self.block1 = SpatioTemporalResBlock(in_channels, out_channels, kernel_size, downsample, conv=conv)
        self.blocks = nn.ModuleList(
            SpatioTemporalResBlock(out_channels, out_channels, kernel_size, conv=conv)
            for _ in range(layer_size - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        for block in self.blocks:
            x = block(x)
        return x


class VideoResNet(nn.Module):
    """Stem (3x7x7, stride 1x2x2) + four residual layers (64, 128, 256, 512 channels).

    Args:
        layer_sizes (Sequence[int]): blocks per layer, (1, 1, 1, 1) for the 10-layer nets,
            (2, 2, 2, 2) for the 18-layer ones.
        with_classifier (bool): add ``linear`` (512 -> num_classes) after pooling.
        return_conv (bool): return the retrieval feature: conv5 -> MaxPool3d((1, 2, 2)) -> flatten,
            9216-d for 16x112x112 inputs.
        num_classes (int): classifier outputs.
        in_channels (int): input channels.
        conv (callable): convolution factory with the signature of :class:`SpatioTemporalConv`.

    Input ``x (Tensor[B, C, T, H, W])``; without classifier the output is the 512-d average-pooled
    post-ReLU feature ``[B, 512]`` (not normalised). Any input size works.
    """

    feature_dim = 512

    def __init__(self, layer_sizes: Sequence[int], with_classifier: bool = False, return_conv: bool = False,
                 num_classes: int = 101, in_channels: int = 3, conv: ConvFactory = SpatioTemporalConv):
        super().__init__()
        if len(layer_sizes) != 4 or min(layer_sizes) < 1:
            raise ValueError(f"layer_sizes must be 4 positive ints, got {tuple(layer_sizes)}")
        self.layer_sizes = tuple(layer_sizes)
        self.with_classifier = with_classifier
        self.return_conv = return_conv
        self.num_classes = num_classes

        self.conv1 = conv(in_channels, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.bn1 = nn.BatchNorm3d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = SpatioTemporalResLayer(64, 64, 3, layer_sizes[0], conv=conv)
        self.conv3 = SpatioTemporalResLayer(64, 128, 3, layer_sizes[1], downsample=True, conv=conv)
        self.conv4 = SpatioTemporalResLayer(128, 256, 3, layer_sizes[2], downsample=True, conv=conv)
        self.conv5 = SpatioTemporalResLayer(256, 512, 3, layer_sizes[3], downsample=True, conv=conv)
        # Parameter-free, so always present: return_conv can be switched after construction.
        self.feature_pool = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.pool = nn.AdaptiveAvgPool3d(1)
        if with_classifier:
            self.linear = nn.Linear(512, num_classes)

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """conv5 activations ``[B, 512, T/8, H/16, W/16]`` (rounded up)."""
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_conv(x)
        if self.return_conv:
            # maps under 2x2 (tiny demo clips) have nothing to pool: the feature is the map itself
            return torch.flatten(self.feature_pool(x) if min(x.shape[-2:]) >= 2 else x, 1)
        x = torch.flatten(self.pool(x), 1)
        if self.with_classifier:
            x = self.linear(x)
        return x


class R3DNet(VideoResNet):
    """R3D: the residual network with full 3x3x3 convolutions."""

    def __init__(self, layer_sizes: Sequence[int] = (1, 1, 1, 1), with_classifier: bool = False,
                 return_conv: bool = False, num_classes: int = 101, in_channels: int = 3):
        super().__init__(layer_sizes, with_classifier=with_classifier, return_conv=return_conv,
                         num_classes=num_classes, in_channels=in_channels, conv=SpatioTemporalConv)
