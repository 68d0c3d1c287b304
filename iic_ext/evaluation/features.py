"""Video-level features for retrieval, kNN and linear probes, with an on-disk cache.

A video's feature is the mean over its clips (``clips_per_video`` clips at linspace positions, centre
crop) of the backbone output on each clip: the pooled last conv map (``return_conv=True``, each model's
``ModelSpec.retrieval``) or the average-pooled feature (``model.feature_dim``: 512, 1024 for I3D and S3D-G). With ``merge`` the RGB feature and the modality's feature are concatenated per
clip (no per-part normalisation, as the original ``retrieve_clips.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..ops import residual_frames
from ..utils.checkpoint import save_checkpoint

__all__ = ["MODALITIES", "needed_modalities", "clip_input", "extract_features", "FeatureCache",
           "file_fingerprint", "settings_key"]

MODALITIES = ("rgb", "res", "u", "v")


def needed_modalities(modality: str, merge: bool = False) -> tuple[str, ...]:
    """Dataset modalities to decode for an input ``modality`` (``res`` is computed from ``rgb``)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    source = "rgb" if modality in ("rgb", "res") else modality
    return ("rgb",) if source == "rgb" else (("rgb", source) if merge else (source,))


def clip_input(clips: torch.Tensor, modality: str, residual_scaled: bool = True) -> torch.Tensor:
    """Network input from decoded clips.

    Args:
        clips (Tensor[B, C, T, H, W], uint8): decoded RGB (``rgb``/``res``) or flow (``u``/``v``) clips.
        modality (str): ``rgb``, ``u``, ``v`` give ``x / 255``; ``res`` gives the residual frames of
            ``x / 255``.
        residual_scaled (bool): ``((x - roll(x)) + 1) / 2`` (retrieval, self-supervised training) or
            ``x - roll(x)`` (the original fine-tuning).

    Returns:
        Tensor[B, C, T, H, W] float32.
    """
    if modality == "res":
        return residual_frames(clips, scaled=residual_scaled)
    if clips.dtype == torch.uint8:
        return clips.float().div_(255.0)
    return clips.float()


def _clips(batch: Dict[str, Any], key: str) -> tuple[torch.Tensor, int, int]:
    """``[B, N, C, T, H, W]`` or ``[B, C, T, H, W]`` -> (``[B*N, C, T, H, W]``, B, N)."""
    x = batch[key]
    if x.dim() == 5:
        return x, x.shape[0], 1
    if x.dim() != 6:
        raise ValueError(f"batch[{key!r}] must be [B, C, T, H, W] or [B, N, C, T, H, W], got {tuple(x.shape)}")
    B, N = x.shape[:2]
    return x.flatten(0, 1), B, N


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, modality: str = "rgb", merge: bool = False,
                     batch_size: int = 8, workers: int = 0, device: str | torch.device = "cpu",
                     residual_scaled: bool = True, progress: bool = True, desc: str = "features",
                     ) -> Dict[str, torch.Tensor]:
    """Video-level features of every video of ``dataset`` (none dropped).

    Args:
        model (nn.Module): backbone returning ``[B, D]`` per clip; put in eval mode here.
        dataset: items ``{"rgb"/"u"/"v": uint8 [N, C, T, H, W] or [C, T, H, W], "label", "index"}``.
        modality (str): ``rgb``, ``res``, ``u`` or ``v``.
        merge (bool): concatenate the RGB feature before the modality's (``[.., 2D]``).

    Returns:
        ``{"features": Tensor[V, D] float32 (cpu), "labels": Tensor[V] int64, "indices": Tensor[V] int64}``
        in dataset order.
    """
    device = torch.device(device)
    model.eval().to(device)
    source = "rgb" if modality in ("rgb", "res") else modality
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    feats, labels, indices = [], [], []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(dataset), desc=desc, unit="video", leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    for batch in loader:
        x, B, N = _clips(batch, source)
        out = model(clip_input(x.to(device, non_blocking=True), modality, residual_scaled))
        if merge and modality != "rgb":
            rgb, _, _ = _clips(batch, "rgb")
            out = torch.cat([model(clip_input(rgb.to(device, non_blocking=True), "rgb")), out], dim=1)
        elif merge:
            out = torch.cat([out, out], dim=1)
        feats.append(out.float().view(B, N, -1).mean(1).cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
        indices.append(torch.as_tensor(batch["index"]).long())
        if bar is not None:
            bar.update(B)
    if bar is not None:
        bar.close()
    if not feats:
        raise ValueError(f"{desc}: the dataset is empty")
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "indices": torch.cat(indices)}


def file_fingerprint(path: str | os.PathLike) -> Dict[str, Any]:
    """Identity of a checkpoint file for cache keys: absolute path, size and SHA-1 of the content."""
    path = os.path.abspath(os.fspath(path))
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"path": path, "size": os.path.getsize(path), "sha1": h.hexdigest()}


def settings_key(settings: Dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    """Features on disk under ``<root>/<key>/<part>.pt`` with ``key`` a hash of every setting that
    changes them (checkpoint content, model, modality, data and clip settings).

    Args:
        root (str): cache folder.
        settings (dict): JSON-serialisable settings; stored next to the features.
    """

    def __init__(self, root: str | os.PathLike, settings: Dict[str, Any]):
        self.settings = dict(settings)
        self.key = settings_key(self.settings)
        self.dir = os.path.join(os.fspath(root), self.key)

    def path(self, part: str) -> str:
        return os.path.join(self.dir, f"{part}.pt")

    def load(self, part: str) -> Optional[Dict[str, torch.Tensor]]:
        p = self.path(part)
        if not os.path.isfile(p):
            return None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is re-extracted, never trusted
            return None
        if not isinstance(obj, dict) or obj.get("key") != self.key or "features" not in obj:
            return None
        return {k: obj[k] for k in ("features", "labels", "indices")}

    def save(self, part: str, data: Dict[str, torch.Tensor]) -> str:
        os.makedirs(self.dir, exist_ok=True)
        p = self.path(part)
        save_checkpoint({"key": self.key, **data}, p)
        settings_path = os.path.join(self.dir, "settings.json")
        if not os.path.isfile(settings_path):
            tmp = f"{settings_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({**self.settings, "created": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1,
                          default=str)
            os.replace(tmp, settings_path)
        return p
