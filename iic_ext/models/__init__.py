"""Backbones of IIC: the original C3D, R3D-10, R(2+1)D-10 and R3D-18 (their parameter names), I3D and
S3D-G (the names of their common PyTorch ports) and torchvision's video ResNets (its names).

:data:`MODELS` (``registry.py``) describes each; :func:`build_model` builds one by name.
"""
from __future__ import annotations

from .c3d import C3D
from .checkpoint import CheckpointError, extract_state_dict, load_weights
from .i3d import InceptionI3d
from .r21d import R2Plus1DNet
from .r3d import R3DNet, VideoResNet
from .registry import MODEL_NAMES, MODELS, ModelSpec, build_model, detect_architecture, model_spec
from .resnet_tv import TorchvisionVideoResNet
from .s3dg import S3DG

__all__ = ["C3D", "R3DNet", "R2Plus1DNet", "VideoResNet", "InceptionI3d", "S3DG", "TorchvisionVideoResNet",
           "ModelSpec", "MODELS", "MODEL_NAMES", "model_spec", "build_model", "detect_architecture",
           "load_weights", "extract_state_dict", "CheckpointError"]
