"""Metric meters and an optional TensorBoard writer."""
from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["AverageMeter", "MetricWriter"]


class AverageMeter:
    """Running average weighted by sample count."""

    def __init__(self):
        self.sum = 0.0
        self.count = 0
        self.val = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else float("nan")


class MetricWriter:
    """Scalars to TensorBoard (when ``tensorboard`` is importable) and epoch records to JSON lines.

    Args:
        log_dir: TensorBoard event folder (None disables TensorBoard).
        jsonl_path: file receiving one JSON object per :meth:`log_epoch` call (None disables it).
        purge_step: TensorBoard ``purge_step`` for resumed runs (drops events at or after that step).
    """

    def __init__(self, log_dir: Optional[str], jsonl_path: Optional[str] = None, purge_step: Optional[int] = None):
        self.tb = None
        self.log_dir = log_dir
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                self.tb = None
            else:
                os.makedirs(log_dir, exist_ok=True)
                self.tb = SummaryWriter(log_dir, purge_step=purge_step)
        self.jsonl_path = jsonl_path

    @property
    def has_tensorboard(self) -> bool:
        return self.tb is not None

    def scalars(self, values: dict, step: int) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def log_epoch(self, record: dict) -> None:
        if self.jsonl_path is None:
            return
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
