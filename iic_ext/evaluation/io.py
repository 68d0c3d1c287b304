"""Atomic JSON results files (checkpoints use :func:`iic_ext.utils.checkpoint.save_checkpoint`)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_json"]


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (indent 2)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
