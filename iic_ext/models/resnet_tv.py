"""The video ResNets of ``torchvision.models.video`` (Tran et al., CVPR 2018) without torchvision.

R3D-18, MC3-18 and R(2+1)D-18 with torchvision's module and parameter names (``stem.0``,
``layer1.0.conv1.0``, ``layer2.0.downsample.0``, ``fc``...), its initialisation and its forward, so
torchvision's state dicts (and its Kinetics-400 weights) load with ``strict=True`` and give the same
features. Unlike the IIC layout (``r3d.py``), the downsampling shortcut of R(2+1)D is a plain 1x1x1
conv, and both (2+1)D convs of a block take the intermediate width computed from the block's input
and output channels (torchvision's choice; the IIC layout computes it per conv).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import nn

__all__ = ["Conv3DSimple", "Conv2Plus1D", "Conv3DNoTemporal", "BasicBlock", "BasicStem", "R2Plus1dStem",
           "TorchvisionVideoResNet", "r3d_18", "mc3_18", "r2plus1d_18"]


class Conv3DSimple(nn.Conv3d):
    """3x3x3 conv without bias; the shortcut strides in time and space."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int = 0, stride: int = 1, padding: int = 1):
        super().__init__(in_planes, out_planes, kernel_size=3, stride=stride, padding=padding, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int):
        return (stride, stride, stride)


class Conv2Plus1D(nn.Sequential):
    """1x3x3 conv -> BN -> ReLU -> 3x1x1 conv (indices 0, 1, 3: torchvision's key names)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1, padding: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, (1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding),
                      bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, (3, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0),
                      bias=False))

    @staticmethod
    def get_downsample_stride(stride: int):
        return (stride, stride, stride)


class Conv3DNoTemporal(nn.Conv3d):
    """1x3x3 conv without bias (MC3's upper layers): time is never strided."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int = 0, stride: int = 1, padding: int = 1):
        super().__init__(in_planes, out_planes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                         padding=(0, padding, padding), bias=False)

    @staticmethod
    def get_downsample_stride(stride: int):
        return (1, stride, stride)


ConvBuilder = Callable[..., nn.Module]


class BasicBlock(nn.Module):
    """``conv1`` = (conv, BN, ReLU), ``conv2`` = (conv, BN), optional ``downsample``, ReLU after the sum."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv_builder: ConvBuilder, stride: int = 1,
                 downsample: nn.Module = None):
        super().__init__()
        # the (2+1)D width that keeps a 3x3x3 conv's parameter count (unused by the plain convs)
        midplanes = (inplanes * planes * 27) // (inplanes * 9 + 3 * planes)
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class BasicStem(nn.Sequential):
    """3x7x7 conv, stride (1, 2, 2) -> BN -> ReLU."""

    def __init__(self, in_channels: int = 3):
        super().__init__(nn.Conv3d(in_channels, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                         nn.BatchNorm3d(64), nn.ReLU(inplace=True))


class R2Plus1dStem(nn.Sequential):
    """1x7x7 conv to 45 channels, stride (1, 2, 2) -> BN -> ReLU -> 3x1x1 conv to 64 -> BN -> ReLU."""

    def __init__(self, in_channels: int = 3):
        super().__init__(nn.Conv3d(in_channels, 45, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
                         nn.BatchNorm3d(45), nn.ReLU(inplace=True),
                         nn.Conv3d(45, 64, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
                         nn.BatchNorm3d(64), nn.ReLU(inplace=True))


class TorchvisionVideoResNet(nn.Module):
    """torchvision's ``VideoResNet`` as a backbone: stem, layer1-4 (64-512 channels), average pool.

    Args:
        conv_makers (Sequence[type]): the conv of each of the four layers.
        layers (Sequence[int]): blocks per layer.
        stem (type): ``BasicStem`` or ``R2Plus1dStem``.
        with_classifier (bool): add ``fc`` (Linear 512 -> num_classes).
        num_classes (int): classifier outputs (400 for the Kinetics weights).
        return_conv (bool): return the retrieval feature: layer4, max-pooled over time to
            ``retrieval_time`` steps when given, -> MaxPool3d((1, 2, 2)) -> flatten.
        in_channels (int): input channels.
        retrieval_time (int | None): temporal size the retrieval feature pools layer4 to (MC3 keeps
            every frame in layer4; 2 makes its feature the size of R3D-18's at 16 frames).
        zero_init_residual (bool): zero the last BN of each block (torchvision's option).

    Input ``x (Tensor[B, C, T, H, W])``; output without classifier: the average-pooled post-ReLU
    layer4 feature ``[B, 512]``.
    """

    feature_dim = 512

    def __init__(self, conv_makers: Sequence[type], layers: Sequence[int], stem: type,
                 with_classifier: bool = False, num_classes: int = 400, return_conv: bool = False,
                 in_channels: int = 3, retrieval_time: int = None, zero_init_residual: bool = False):
        super().__init__()
        self.with_classifier = with_classifier
        self.return_conv = return_conv
        self.num_classes = num_classes
        self.inplanes = 64
        self.stem = stem(in_channels)
        self.layer1 = self._make_layer(conv_makers[0], 64, layers[0], stride=1)
        self.layer2 = self._make_layer(conv_makers[1], 128, layers[1], stride=2)
        self.layer3 = self._make_layer(conv_makers[2], 256, layers[2], stride=2)
        self.layer4 = self._make_layer(conv_makers[3], 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        # Parameter-free, so always present: return_conv can be switched after construction.
        self.time_pool = nn.AdaptiveMaxPool3d((retrieval_time, None, None)) if retrieval_time else nn.Identity()
        self.feature_pool = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        if with_classifier:
            self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2[1].weight)

    def _make_layer(self, conv_builder: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1,
                          stride=conv_builder.get_downsample_stride(stride), bias=False),
                nn.BatchNorm3d(planes * BasicBlock.expansion))
        layers: List[nn.Module] = [BasicBlock(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """layer4 activations ``[B, 512, T', H/16, W/16]`` (rounded up; T' = T/8, or T for MC3)."""
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_conv(x)
        if self.return_conv:
            x = self.time_pool(x)
            # maps under 2x2 (tiny demo clips) have nothing to pool: the feature is the map itself
            return torch.flatten(self.feature_pool(x) if min(x.shape[-2:]) >= 2 else x, 1)
        x = torch.flatten(self.avgpool(x), 1)
        if self.with_classifier:
            x = self.fc(x)
        return x


def r3d_18(**kwargs) -> TorchvisionVideoResNet:
    """torchvision's R3D-18: 3x3x3 convs everywhere. kwargs: those of :class:`TorchvisionVideoResNet`."""
    return TorchvisionVideoResNet([Conv3DSimple] * 4, [2, 2, 2, 2], BasicStem, **kwargs)


def mc3_18(**kwargs) -> TorchvisionVideoResNet:
    """torchvision's MC3-18: 3x3x3 convs in layer1, 1x3x3 after (time keeps its full length)."""
    kwargs.setdefault("retrieval_time", 2)
    return TorchvisionVideoResNet([Conv3DSimple] + [Conv3DNoTemporal] * 3, [2, 2, 2, 2], BasicStem, **kwargs)


def r2plus1d_18(**kwargs) -> TorchvisionVideoResNet:
    """torchvision's R(2+1)D-18: (2+1)D convs and stem."""
    return TorchvisionVideoResNet([Conv2Plus1D] * 4, [2, 2, 2, 2], R2Plus1dStem, **kwargs)
