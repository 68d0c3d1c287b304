"""Inception-v1 I3D (Carreira & Zisserman, CVPR 2017) with the module names of piergiaj/pytorch-i3d.

Module and parameter names (``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.*``, ``Mixed_3b.b1a``,
..., ``Mixed_5c.b3b``, ``logits.conv3d.weight/bias``), the bias-free convolutions with
``BatchNorm3d(eps=1e-3, momentum=0.01)`` and the TensorFlow "SAME" padding computed from each input
follow that port, so its ``rgb_imagenet.pt`` / ``rgb_charades.pt`` load with ``strict=True``.

Departures, for clips other than 64x224x224: the port's fixed ``AvgPool3d([2, 7, 7])`` is an adaptive
spatial average (any clip size works), and the classifier logits, computed per time step by the
1x1x1 ``logits`` convolution as in the port, are averaged over every time step (the port's 2-frame
window weights the first and last step half as much).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _triple

__all__ = ["same_padding", "MaxPool3dSamePadding", "Unit3D", "InceptionModule", "InceptionI3d"]


def same_padding(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``x [B, C, T, H, W]`` as TensorFlow's "SAME": the output has ceil(size / stride) cells.

    The extra cell of an odd total padding goes after, as in TensorFlow.
    """
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(tuple(kernel_size)), reversed(tuple(stride))):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class MaxPool3dSamePadding(nn.Module):
    """Max pooling after "SAME" zero padding (inputs are post-ReLU, so a zero never wins over data)."""

    def __init__(self, kernel_size, stride):
        super().__init__()
        self.kernel_size, self.stride = _triple(kernel_size), _triple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(same_padding(x, self.kernel_size, self.stride), self.kernel_size, self.stride)


class Unit3D(nn.Module):
    """"SAME"-padded Conv3d (``conv3d``), optional ``bn`` and ReLU: the port's conv unit.

    Args:
        in_channels (int), out_channels (int): channels.
        kernel_size, stride: int or (t, h, w).
        activation (bool): ReLU after the (normalised) convolution.
        use_batch_norm (bool): ``bn = BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)``.
        use_bias (bool): convolution bias (only the ``logits`` unit has one).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, activation: bool = True,
                 use_batch_norm: bool = True, use_bias: bool = False):
        super().__init__()
        self.kernel_size, self.stride = _triple(kernel_size), _triple(stride)
        self.activation = activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel_size, stride=self.stride, padding=0,
                                bias=use_bias)
        if use_batch_norm:
            self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01)
        else:
            self.bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(same_padding(x, self.kernel_size, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.activation else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1x1 (``b0``); 1x1x1 -> 3x3x3 (``b1a``, ``b1b``);
    1x1x1 -> 3x3x3 (``b2a``, ``b2b``); 3x3x3 max pool -> 1x1x1 (``b3a``, ``b3b``).

    Args:
        in_channels (int): input channels.
        widths (Sequence[int]): ``(b0, b1a, b1b, b2a, b2b, b3b)`` output channels; the module outputs
            ``b0 + b1b + b2b + b3b``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0, 1)
        self.b1a = Unit3D(in_channels, w1a, 1)
        self.b1b = Unit3D(w1a, w1b, 3)
        self.b2a = Unit3D(in_channels, w2a, 1)
        self.b2b = Unit3D(w2a, w2b, 3)
        self.b3a = MaxPool3dSamePadding(3, 1)
        self.b3b = Unit3D(in_channels, w3b, 1)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# (name, input channels, branch widths) of the Inception-v1 mixed layers; the max pools sit before
# Mixed_3b, Mixed_4b and Mixed_5b.
_MIXED: Tuple[Tuple[str, int, Tuple[int, ...]], ...] = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)


class InceptionI3d(nn.Module):
    """I3D backbone: stem, nine Inception modules, adaptive average pooling (1024-d feature).

    Args:
        with_classifier (bool): add ``logits`` (1x1x1 conv with bias, ``num_classes`` outputs).
        num_classes (int): classifier outputs (400 for the Kinetics weights of the port).
        return_conv (bool): return the retrieval feature: Mixed_5c ``[B, 1024, T/8, H/32, W/32]``
            (rounded up) -> AdaptiveMaxPool3d((1, 2, 2)) -> flatten, ``[B, 4096]`` at any clip size.
        in_channels (int): 3 for RGB, 2 for the port's optical-flow model.
        dropout (float): dropout before ``logits`` (the port's 0.5).

    Input ``x (Tensor[B, C, T, H, W])``; the stride is 8 in time and 32 in space, and the "SAME"
    padding accepts any size. Output without classifier: the average-pooled post-ReLU Mixed_5c
    feature ``[B, 1024]``; with it, ``[B, num_classes]``.
    """

    feature_dim = 1024

    def __init__(self, with_classifier: bool = False, num_classes: int = 400, return_conv: bool = False,
                 in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.with_classifier = with_classifier
        self.return_conv = return_conv
        self.num_classes = num_classes

        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, 7, stride=2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", 3, 2), "Mixed_5b": ("MaxPool3d_5a_2x2", 2, 2)}
        for name, cin, widths in _MIXED:
            if name in pools:
                pool, k, s = pools[name]
                self.add_module(pool, MaxPool3dSamePadding(k, s))
            self.add_module(name, InceptionModule(cin, widths))

        # Parameter-free, so always present: return_conv can be switched after construction.
        self.feature_pool = nn.AdaptiveMaxPool3d((1, 2, 2))
        self.spatial_pool = nn.AdaptiveAvgPool3d((None, 1, 1))
        self.dropout = nn.Dropout(dropout)
        if with_classifier:
            self.logits = self._new_logits(num_classes)

    @staticmethod
    def _new_logits(num_classes: int) -> Unit3D:
        return Unit3D(1024, num_classes, 1, activation=False, use_batch_norm=False, use_bias=True)

    def replace_logits(self, num_classes: int) -> None:
        """A new ``logits`` layer of ``num_classes`` outputs (the port's method, for fine-tuning)."""
        device = next(self.parameters()).device
        self.logits = self._new_logits(num_classes).to(device)
        self.num_classes = num_classes
        self.with_classifier = True

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c activations ``[B, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]``."""
        x = self.Conv3d_1a_7x7(x)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(x)))
        x = self.MaxPool3d_3a_3x3(x)
        for name, _, _ in _MIXED:
            if name == "Mixed_4b":
                x = self.MaxPool3d_4a_3x3(x)
            elif name == "Mixed_5b":
                x = self.MaxPool3d_5a_2x2(x)
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_conv(x)
        if self.return_conv:
            return torch.flatten(self.feature_pool(x), 1)
        x = self.spatial_pool(x)  # [B, 1024, T', 1, 1]
        if self.with_classifier:
            # per-time-step logits as the port, then their mean over time
            return self.logits(self.dropout(x)).mean(dim=(2, 3, 4))
        return x.mean(dim=(2, 3, 4))
