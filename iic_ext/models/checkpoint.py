"""Loading backbone weights from the checkpoint layouts the original IIC / VCOP code writes.

Accepted layouts:

* ``{'model': state_dict, 'contrast': ..., 'optimizer': ..., 'epoch': ..., 'opt': Namespace}``
  (self-supervised training, also ``{'model': ...}`` from fine-tuning);
* ``{'state_dict': state_dict}``;
* a plain state dict (released fine-tuned weights);
* keys prefixed with ``module.`` (``nn.DataParallel``) and/or ``base_network.`` (VCOP-style wrappers).
  When ``base_network.`` keys are present, only those are taken as backbone weights and the others are
  reported as unexpected.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..utils.checkpoint import CheckpointError

__all__ = ["CheckpointError", "load_weights", "extract_state_dict", "classifier_prefix"]

logger = logging.getLogger(__name__)

_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "net")
_CLASSIFIER_PREFIX = "linear."




def classifier_prefix(model: nn.Module) -> str:
    """State-dict prefix of the model's classifier: ``linear.`` (the original nets), ``fc.``, ``logits.``."""
    arch = getattr(model, "arch", None)
    if arch is not None:
        from .registry import MODELS

        if arch in MODELS:
            return MODELS[arch].classifier + "."
    return _CLASSIFIER_PREFIX


def _check_architecture(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """One error naming both architectures when ``sd`` is a whole state dict of another backbone."""
    from .registry import detect_architecture

    found = detect_architecture(sd)
    if found is None:
        return
    # compared by key structure, so e.g. r3d built with layer_sizes=(2, 2, 2, 2) takes r3d18 weights
    own = detect_architecture(model.state_dict())
    if own is None or own == found:
        return
    name = getattr(model, "arch", own)
    sample = ", ".join(k for k in list(sd)[:3])
    raise CheckpointError(f"{source} holds {_article(found)} {found} state dict ({sample}, ...; {len(sd)} tensors), "
                          f"the model is {name}: build the model with --model {found} or give "
                          f"{_article(name)} {name} checkpoint")


def _article(name: str) -> str:
    # as read aloud: "a c3d", "an r3d", "an i3d", "an s3dg", "an mc3_18"
    return "a" if name.startswith("c") else "an"


def _read(path: str | os.PathLike, weights_only: bool) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        # The original training script pickles its argparse.Namespace under 'opt'.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch raises several unrelated types for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            + ("" if weights_only is False else
               " (if the file is trusted and holds other Python objects, pass weights_only=False)")
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the backbone state dict in a loaded checkpoint and strip wrapper prefixes.

    Returns:
        (state_dict, dropped): the backbone tensors with ``module.`` / ``base_network.`` removed, and
        the keys that were present but are not backbone weights (non-``base_network.`` keys of a
        wrapped model).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")
    sd: Any = obj
    if not _is_state_dict(sd):
        for key in _NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
        else:
            raise CheckpointError(
                f"{source}: no state dict found (top-level keys: {sorted(map(str, obj))[:10]}); expected a "
                f"state dict or a dict with one of {list(_NESTED_KEYS)}")
    sd = {k: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:5]}")

    def strip(key: str, prefix: str) -> str:
        while key.startswith(prefix):
            key = key[len(prefix):]
        return key

    sd = {strip(k, "module."): v for k, v in sd.items()}
    dropped: list[str] = []
    if any(k.startswith("base_network.") for k in sd):
        dropped = [k for k in sd if not k.startswith("base_network.")]
        sd = {strip(k[len("base_network."):], "module."): v for k, v in sd.items()
              if k.startswith("base_network.")}
    return sd, dropped


def load_weights(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                 strict: bool = False, weights_only: bool = True,
                 new_head: bool = False) -> tuple[list[str], list[str]]:
    """Load backbone weights, reporting every key that does not match.

    Args:
        model (nn.Module): the backbone (any model of :func:`~iic_ext.models.build_model`, or one of
            the classes).
        path_or_state_dict (str | PathLike | Mapping): a checkpoint file or an already loaded object in
            any layout listed in the module docstring.
        strict (bool): raise :class:`CheckpointError` if any key is missing or unexpected.
        weights_only (bool): passed to ``torch.load``; ``argparse.Namespace`` is allowed in any case.
        new_head (bool): fine-tuning: checkpoint classifier tensors whose shapes differ from the model's
            (e.g. 400 Kinetics classes into a 101-class model) are dropped and reported as unexpected,
            instead of a shape mismatch, leaving the model's new head at its initialisation.

    Returns:
        (missing, unexpected): model keys absent from the checkpoint, checkpoint keys the model lacks.
        Missing classifier keys (``linear.*``, ``fc.*`` or ``logits.*`` by the model's registry entry,
        expected when fine-tuning from self-supervised weights) are logged at INFO; all other mismatches
        are warned.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: unreadable/corrupt file (message names the file), no state dict in it, a state
            dict of another architecture (message names both, see
            :func:`~iic_ext.models.detect_architecture`), a shape mismatch (message names the key and both
            shapes), or a key mismatch with ``strict=True``.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        obj = _read(source, weights_only)
    else:
        source = "state dict"
        obj = path_or_state_dict
    sd, dropped = extract_state_dict(obj, source)
    _check_architecture(model, sd, source)

    own = model.state_dict()
    if new_head:
        head = classifier_prefix(model)
        stale = [k for k in sd if k.startswith(head) and k in own and sd[k].shape != own[k].shape]
        if stale:
            logger.info("%s: classifier keys of another shape dropped for the new head: %s", source, stale)
        dropped = dropped + stale
        sd = {k: v for k, v in sd.items() if k not in stale}
    # Checkpoints written before torch 0.4.1 (e.g. the I3D port's) have no BN counters; torch fills them.
    missing = [k for k in own if k not in sd and not (
        k.endswith(".num_batches_tracked") and k[: -len("num_batches_tracked")] + "running_mean" in sd)]
    unexpected = [k for k in sd if k not in own] + dropped
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and sd[k].shape != own[k].shape]
    if mismatched:
        lines = "; ".join(f"{k}: checkpoint {s} vs model {m}" for k, s, m in mismatched[:10])
        raise CheckpointError(f"{source}: shape mismatch for {len(mismatched)} key(s): {lines}")
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: strict load failed; missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}")

    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)

    head = classifier_prefix(model)
    head_missing = [k for k in missing if k.startswith(head)]
    other_missing = [k for k in missing if not k.startswith(head)]
    if head_missing:
        logger.info("%s: classifier keys not in checkpoint, left at initialisation: %s", source, head_missing)
    if other_missing:
        warnings.warn(f"{source}: {len(other_missing)} model key(s) missing from checkpoint, left at "
                      f"initialisation: {other_missing[:20]}{' ...' if len(other_missing) > 20 else ''}",
                      stacklevel=2)
    if unexpected:
        warnings.warn(f"{source}: {len(unexpected)} checkpoint key(s) not used by the model: "
                      f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}", stacklevel=2)
    logger.info("%s: loaded %d tensors", source, len(own) - len(missing))
    return missing, unexpected
