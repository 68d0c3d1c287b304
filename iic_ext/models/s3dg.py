"""S3D-G: separable 3D Inception-v1 with feature gating (Xie et al., "Rethinking Spatiotemporal Feature
Learning", ECCV 2018).

Module names follow the S3D-G port of S3D_HowTo100M / MIL-NCE (Miech et al. 2020): ``conv1``,
``conv_2b``, ``conv_2c``, ``gating``, ``mixed_3b`` ... ``mixed_5c`` with branches ``conv_b0``,
``conv_b1_a``, ``conv_b1_b``, ``conv_b2_a``, ``conv_b2_b``, ``conv_b3_b`` and gates ``gating_b0`` ...
``gating_b3``, and the head ``fc``. Each conv unit holds ``conv1``/``bn1`` and, when separable,
``conv2``/``bn2`` (the temporal ``k x 1 x 1`` half). With ``space_to_depth=True`` the stem is that
port's TPU variant (2x2x2 space-to-depth, then a 2x4x4 conv), so the video tower of its
``s3d_howto100m.pth`` loads (its ``text_module.*`` keys are reported as unexpected).

As in TensorFlow-slim's ``s3dg``, the stem is a full (not separable) 3x7x7 conv with stride 2, every
other 3x3x3 conv is separable (1x3x3 then 3x1x1), and gating starts at ``conv_2c``. Max pools use
TensorFlow "SAME" padding computed per input, so any clip size works.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.nn.modules.utils import _triple

from .i3d import _MIXED as I3D_MIXED, MaxPool3dSamePadding

__all__ = ["STConv3D", "SelfGating", "InceptionBlock", "S3DG"]


class STConv3D(nn.Module):
    """Conv-BN-ReLU, or with ``separable`` spatial conv-BN-ReLU then temporal conv-BN-ReLU (no biases).

    Args:
        in_channels (int), out_channels (int): channels (the separable pair keeps ``out_channels``
            between its halves, as the port does).
        kernel_size, stride, padding: int or (t, h, w).
        separable (bool): factor a ``t x k x k`` kernel (t > 1) into ``1 x k x k`` and ``t x 1 x 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 separable: bool = False):
        super().__init__()
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = _triple(kernel_size), _triple(stride), _triple(padding)
        self.separable = separable and kt > 1
        if self.separable:
            self.conv1 = nn.Conv3d(in_channels, out_channels, (1, kh, kw), stride=(1, sh, sw), padding=(0, ph, pw),
                                   bias=False)
            self.bn1 = nn.BatchNorm3d(out_channels)
            self.conv2 = nn.Conv3d(out_channels, out_channels, (kt, 1, 1), stride=(st, 1, 1), padding=(pt, 0, 0),
                                   bias=False)
            self.bn2 = nn.BatchNorm3d(out_channels)
        else:
            self.conv1 = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(st, sh, sw),
                                   padding=(pt, ph, pw), bias=False)
            self.bn1 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.separable:
            x = self.relu(self.bn2(self.conv2(x)))
        return x


class SelfGating(nn.Module):
    """Feature gating: ``x * sigmoid(fc(mean over T, H, W of x))``, one weight per channel and sample."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))
        return x * weights[:, :, None, None, None]


class InceptionBlock(nn.Module):
    """The separable Inception module, each branch gated.

    Args:
        in_channels (int): input channels.
        widths (tuple[int, ...]): ``(b0, b1_a, b1_b, b2_a, b2_b, b3_b)`` output channels.
        gating (bool): gate each branch (S3D-G); without, plain S3D.
    """

    def __init__(self, in_channels: int, widths: Tuple[int, ...], gating: bool = True):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.conv_b0 = STConv3D(in_channels, w0, 1)
        self.conv_b1_a = STConv3D(in_channels, w1a, 1)
        self.conv_b1_b = STConv3D(w1a, w1b, 3, padding=1, separable=True)
        self.conv_b2_a = STConv3D(in_channels, w2a, 1)
        self.conv_b2_b = STConv3D(w2a, w2b, 3, padding=1, separable=True)
        self.maxpool_b3 = MaxPool3dSamePadding(3, 1)
        self.conv_b3_b = STConv3D(in_channels, w3b, 1)
        self.use_gating = gating
        if gating:
            self.gating_b0, self.gating_b1 = SelfGating(w0), SelfGating(w1b)
            self.gating_b2, self.gating_b3 = SelfGating(w2b), SelfGating(w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.conv_b0(x)
        b1 = self.conv_b1_b(self.conv_b1_a(x))
        b2 = self.conv_b2_b(self.conv_b2_a(x))
        b3 = self.conv_b3_b(self.maxpool_b3(x))
        if self.use_gating:
            b0, b1, b2, b3 = self.gating_b0(b0), self.gating_b1(b1), self.gating_b2(b2), self.gating_b3(b3)
        return torch.cat([b0, b1, b2, b3], 1)


# The Inception-v1 widths, as in I3D, under the S3D port's lower-case names.
_MIXED: Tuple[Tuple[str, int, Tuple[int, ...]], ...] = tuple((name.lower(), c, w) for name, c, w in I3D_MIXED)


class S3DG(nn.Module):
    """S3D-G backbone (1024-d feature).

    Args:
        with_classifier (bool): add ``fc`` (Linear 1024 -> num_classes).
        num_classes (int): classifier outputs (512 for the HowTo100M video embedding).
        return_conv (bool): return the retrieval feature: mixed_5c ``[B, 1024, T/8, H/32, W/32]``
            (rounded up) -> AdaptiveMaxPool3d((1, 2, 2)) -> flatten, ``[B, 4096]``.
        in_channels (int): input channels.
        space_to_depth (bool): the HowTo100M port's stem; T, H and W must then be even.
        gating (bool): feature gating (S3D-G); False gives S3D.

    Input ``x (Tensor[B, C, T, H, W])``; output without classifier: the mean over time and space of
    mixed_5c, ``[B, 1024]``.
    """

    feature_dim = 1024

    def __init__(self, with_classifier: bool = False, num_classes: int = 400, return_conv: bool = False,
                 in_channels: int = 3, space_to_depth: bool = False, gating: bool = True):
        super().__init__()
        self.with_classifier = with_classifier
        self.return_conv = return_conv
        self.num_classes = num_classes
        self.space_to_depth = space_to_depth
        self.use_gating = gating
        if space_to_depth:
            self.conv1 = STConv3D(8 * in_channels, 64, (2, 4, 4), stride=1, padding=(1, 2, 2))
            self.min_clip = (2, 2, 2)
        else:
            self.conv1 = STConv3D(in_channels, 64, (3, 7, 7), stride=2, padding=(1, 3, 3))
        self.maxpool_2a = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.conv_2b = STConv3D(64, 64, 1)
        self.conv_2c = STConv3D(64, 192, 3, padding=1, separable=True)
        if gating:
            self.gating = SelfGating(192)
        self.maxpool_3a = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        pools = {"mixed_4b": ("maxpool_4a", 3, 2), "mixed_5b": ("maxpool_5a", 2, 2)}
        for name, cin, widths in _MIXED:
            if name in pools:
                pool, k, s = pools[name]
                self.add_module(pool, MaxPool3dSamePadding(k, s))
            self.add_module(name, InceptionBlock(cin, widths, gating=gating))
        # Parameter-free, so always present: return_conv can be switched after construction.
        self.feature_pool = nn.AdaptiveMaxPool3d((1, 2, 2))
        if with_classifier:
            self.fc = nn.Linear(1024, num_classes)

    @staticmethod
    def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, 8C, T/2, H/2, W/2]``, the channel order of the HowTo100M port."""
        b, c, t, h, w = x.shape
        if t % 2 or h % 2 or w % 2:
            raise ValueError(f"s3dg (space_to_depth): T, H and W must be even, got {tuple(x.shape)}")
        x = x.reshape(b, c, t // 2, 2, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
        return x.reshape(b, 8 * c, t // 2, h // 2, w // 2)

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """mixed_5c activations ``[B, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]``."""
        if self.space_to_depth:
            # the port crops the first row/column/frame to reproduce TensorFlow's "SAME" alignment
            x = self.conv1(self._space_to_depth(x))[:, :, 1:, 1:, 1:]
        else:
            x = self.conv1(x)
        x = self.conv_2c(self.conv_2b(self.maxpool_2a(x)))
        if self.use_gating:
            x = self.gating(x)
        x = self.maxpool_3a(x)
        for name, _, _ in _MIXED:
            if name == "mixed_4b":
                x = self.maxpool_4a(x)
            elif name == "mixed_5b":
                x = self.maxpool_5a(x)
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_conv(x)
        if self.return_conv:
            return torch.flatten(self.feature_pool(x), 1)
        x = x.mean(dim=(2, 3, 4))
        if self.with_classifier:
            x = self.fc(x)
        return x
