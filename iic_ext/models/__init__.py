"""Backbones of IIC: C3D, R3D-10, R(2+1)D-10 and R3D-18, with the original parameter names."""
from __future__ import annotations

from torch import nn

from .c3d import C3D
from .checkpoint import CheckpointError, extract_state_dict, load_weights
from .r21d import R2Plus1DNet
from .r3d import R3DNet, VideoResNet

__all__ = ["C3D", "R3DNet", "R2Plus1DNet", "VideoResNet", "MODEL_NAMES", "build_model", "load_weights",
           "extract_state_dict", "CheckpointError"]

MODEL_NAMES = ("c3d", "r3d", "r21d", "r3d18")


def build_model(name: str, *, with_classifier: bool = False, num_classes: int = 101,
                return_conv: bool = False, in_channels: int = 3, **options) -> nn.Module:
    """Build a backbone by name.

    Args:
        name (str): ``c3d``, ``r3d`` (R3D-10, layer sizes (1, 1, 1, 1)), ``r21d`` (R(2+1)D-10) or
            ``r3d18`` (R3D-18, (2, 2, 2, 2)).
        with_classifier (bool): add the ``linear`` classifier.
        num_classes (int): classifier outputs.
        return_conv (bool): forward returns the conv5 retrieval feature.
        in_channels (int): input channels (3).
        **options: ``layer_sizes`` overrides the depth of the residual nets.

    Returns:
        nn.Module: forward maps ``[B, C, T, H, W]`` to ``[B, 512]`` (features), ``[B, num_classes]``
        (classifier) or ``[B, D]`` (return_conv).
    """
    key = name.lower().replace("-", "").replace("_", "").replace("(2+1)d", "21d")
    common = dict(with_classifier=with_classifier, num_classes=num_classes, return_conv=return_conv,
                  in_channels=in_channels)
    if key == "c3d":
        if options:
            raise TypeError(f"c3d takes no options {sorted(options)}")
        return C3D(**common)
    layer_sizes = options.pop("layer_sizes", None)
    if options:
        raise TypeError(f"unknown options for {name}: {sorted(options)}")
    if key in ("r3d", "r3d10"):
        return R3DNet(layer_sizes or (1, 1, 1, 1), **common)
    if key in ("r21d", "r21d10", "r2plus1d"):
        return R2Plus1DNet(layer_sizes or (1, 1, 1, 1), **common)
    if key == "r3d18":
        return R3DNet(layer_sizes or (2, 2, 2, 2), **common)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
