"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the destination folder, flushed and fsynced, then
renamed over the destination with ``os.replace`` (atomic on POSIX and Windows). A crash at any point
leaves either the previous file or the new one, never a half-written file under the checkpoint name.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import Any, Mapping, Optional, Sequence

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "TMP_PREFIX"]

TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, unreadable, lacks required entries, or does not fit the
    model it is loaded into: the one error type of every command's checkpoint reading.

    ``CheckpointError(path, problem)`` reads ``"<path>: <problem>"``; ``CheckpointError(message)`` is a
    message that names its source itself.

    Attributes:
        path (str or None): the file, when given separately.
        problem (str): what is wrong.
    """

    def __init__(self, path_or_message: str | os.PathLike, problem: Optional[str] = None):
        if problem is None:
            self.path, self.problem = None, str(path_or_message)
            super().__init__(self.problem)
        else:
            self.path, self.problem = os.fspath(path_or_message), problem
            super().__init__(f"{self.path}: {problem}")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write ``state`` with ``torch.save`` to ``path`` atomically.

    Args:
        state: anything ``torch.save`` accepts (keep it to tensors and plain Python values so that
            ``torch.load(weights_only=True)`` reads it back).
        path: destination file; its folder is created if needed.

    Returns:
        str: ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    required: Sequence[str] = (),
    weights_only: Optional[bool] = True,
) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` dict).

    Args:
        path: the file.
        map_location: passed to ``torch.load``.
        required: keys that must be present.
        weights_only: ``torch.load``'s safe unpickler (tensors and plain Python values only).

    Returns:
        dict: the saved state.

    Raises:
        CheckpointError: naming ``path`` when it is missing, empty, truncated, not a checkpoint, or
            lacks one of ``required``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "checkpoint file not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "checkpoint file is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise CheckpointError(path, f"cannot read checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(path, f"expected a dict, found {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(path, f"missing entries {missing} (found {sorted(state)})")
    return state
