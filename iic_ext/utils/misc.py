"""What every command shares: device selection, seeding, RNG state capture/restore, the per-epoch
seeded sampler and options as plain values."""
from __future__ import annotations

import os
import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["select_device", "seed_everything", "epoch_seed", "EpochSampler", "capture_rng_state", "restore_rng_state",
           "plain", "plain_args"]


def select_device(name: Optional[str], gpu: Optional[int] = None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; ``gpu`` picks the CUDA index."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: no CUDA device is available")
        if name == "cuda" and gpu is not None:
            name = f"cuda:{gpu}"
    return torch.device(name)


def plain(value):
    """``value`` as JSON-able Python values (lists for tuples, strings for anything else)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def plain_args(args) -> dict:
    """A command's options (an ``argparse.Namespace``) as plain values, private ``_`` entries left out:
    what checkpoints, ``args.json`` and result files record."""
    return {k: plain(v) for k, v in vars(args).items() if not k.startswith("_")}


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, epoch, stream)``, independent of anything else."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]).generate_state(2)
    return (int(state[0]) << 32 | int(state[1])) >> 1


class EpochSampler(Sampler[int]):
    """Random order of ``range(n)`` that depends only on ``(seed, epoch)``.

    Call :meth:`set_epoch` before each epoch. The order does not depend on the global RNG, on the
    number of DataLoader workers or on what ran before, so a resumed run sees the same batches.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, stream=1))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _np_state_to_saveable(state):
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _np_state_from_saved(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def capture_rng_state(**generators: Optional[torch.Generator]) -> dict:
    """Every RNG state as tensors and plain Python values (loadable with ``weights_only=True``).

    Args:
        **generators: named ``torch.Generator`` objects (e.g. ``negative=``, ``nce=``); None is skipped.

    Returns:
        dict with ``python``, ``numpy``, ``torch``, ``cuda`` (list, one per device) and ``generators``.
    """
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _np_state_to_saveable(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in generators.items() if g is not None},
    }
    return state


def restore_rng_state(state: dict, **generators: Optional[torch.Generator]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when devices are present)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(_np_state_from_saved(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    saved = state.get("generators", {})
    for name, g in generators.items():
        if g is None:
            continue
        if name not in saved:
            raise KeyError(f"no saved state for generator {name!r} (saved: {sorted(saved)})")
        g.set_state(saved[name].to(device="cpu") if g.device.type == "cpu" else saved[name])
