"""C3D with batch normalisation, as used by IIC and VCOP.

Parameter and buffer names follow the original modules (``conv1``, ``bn1``, ``conv3a`` ... ``bn5b``,
``linear``) so that checkpoints written by the original code load with ``strict=True``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["C3D"]


def _conv(in_channels: int, out_channels: int) -> nn.Conv3d:
    # The original C3D convolutions keep their bias even though a BatchNorm follows.
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)


class C3D(nn.Module):
    """C3D backbone: 8 convolutions with BN, global average pooling instead of fc6/fc7.

    Args:
        with_classifier (bool): add ``linear`` (512 -> num_classes) after pooling.
        return_conv (bool): return the retrieval feature instead: conv5b ->
            MaxPool3d((1, 2, 2)) -> flatten, ``[B, 512 * T/8 * H/32 * W/32]``.
        num_classes (int): classifier outputs.
        in_channels (int): input channels (3 for RGB, residual and replicated flow).

    Input ``x (Tensor[B, C, T, H, W])``; without classifier the output is the 512-d average-pooled
    post-ReLU feature ``[B, 512]``.
    """

    feature_dim = 512

    def __init__(self, with_classifier: bool = False, return_conv: bool = False,
                 num_classes: int = 101, in_channels: int = 3):
        super().__init__()
        self.with_classifier = with_classifier
        self.return_conv = return_conv
        self.num_classes = num_classes

        self.conv1, self.bn1, self.relu1 = _conv(in_channels, 64), nn.BatchNorm3d(64), nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.conv2, self.bn2, self.relu2 = _conv(64, 128), nn.BatchNorm3d(128), nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv3a, self.bn3a, self.relu3a = _conv(128, 256), nn.BatchNorm3d(256), nn.ReLU(inplace=True)
        self.conv3b, self.bn3b, self.relu3b = _conv(256, 256), nn.BatchNorm3d(256), nn.ReLU(inplace=True)
        self.pool3 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv4a, self.bn4a, self.relu4a = _conv(256, 512), nn.BatchNorm3d(512), nn.ReLU(inplace=True)
        self.conv4b, self.bn4b, self.relu4b = _conv(512, 512), nn.BatchNorm3d(512), nn.ReLU(inplace=True)
        self.pool4 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv5a, self.bn5a, self.relu5a = _conv(512, 512), nn.BatchNorm3d(512), nn.ReLU(inplace=True)
        self.conv5b, self.bn5b, self.relu5b = _conv(512, 512), nn.BatchNorm3d(512), nn.ReLU(inplace=True)

        # Parameter-free, so always present: return_conv can be switched after construction.
        self.feature_pool = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.pool5 = nn.AdaptiveAvgPool3d(1)
        if with_classifier:
            self.linear = nn.Linear(512, num_classes)

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """conv5b activations ``[B, 512, T/8, H/16, W/16]``."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3a(self.bn3a(self.conv3a(x)))
        x = self.pool3(self.relu3b(self.bn3b(self.conv3b(x))))
        x = self.relu4a(self.bn4a(self.conv4a(x)))
        x = self.pool4(self.relu4b(self.bn4b(self.conv4b(x))))
        x = self.relu5a(self.bn5a(self.conv5a(x)))
        return self.relu5b(self.bn5b(self.conv5b(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_conv(x)
        if self.return_conv:
            # maps under 2x2 (tiny demo clips) have nothing to pool: the feature is the map itself
            return torch.flatten(self.feature_pool(x) if min(x.shape[-2:]) >= 2 else x, 1)
        x = torch.flatten(self.pool5(x), 1)
        if self.with_classifier:
            x = self.linear(x)
        return x
