"""Training utilities: atomic checkpoints, RNG state capture, metric logging."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .logging import AverageMeter, MetricWriter
from .misc import EpochSampler, capture_rng_state, epoch_seed, restore_rng_state, seed_everything

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "AverageMeter",
    "MetricWriter",
    "EpochSampler",
    "seed_everything",
    "epoch_seed",
    "capture_rng_state",
    "restore_rng_state",
]
