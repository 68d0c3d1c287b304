"""Frame-index samplers for the intra-negatives.

All randomness goes through a ``torch.Generator`` (never Python's ``random``), so the same seed gives
the same negatives, and the kernels themselves stay deterministic: they take the indices drawn here.
Each sampler returns ``time_index`` (Tensor[B, T_out], int64) for ``temporal_gather``.
"""
from typing import Optional

import torch

SHUFFLE_MODES = ("swap", "permute", "reverse")


def _device(generator, device):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def repeat_index(batch: int, num_frames: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Index of the repeat negative: one frame drawn uniformly per sample, tiled over time.

    Returns:
        Tensor[batch, num_frames] (int64): row b is ``[f_b] * num_frames`` with ``f_b ~ U{0..T-1}``.
    """
    dev = _device(generator, device)
    frame = torch.randint(0, num_frames, (batch, 1), generator=generator, device=dev)
    return frame.expand(batch, num_frames).contiguous()


def chunk_bounds(num_frames: int, chunks: int = 4):
    """Start and length of each time chunk, exactly as ``torch.chunk(clip, chunks, dim=time)`` splits.

    ``torch.chunk`` makes chunks of ``ceil(T / chunks)`` frames, the last one shorter, and may return
    fewer than ``chunks`` pieces when T is small (T = 5 gives 3 chunks of 2, 2, 1).
    """
    size = -(-num_frames // chunks)
    return [(s, min(size, num_frames - s)) for s in range(0, num_frames, size)]


def swap_pairs(batch: int, num_chunks: int, generator: Optional[torch.Generator] = None, device=None):
    """Two distinct chunk positions per sample, uniform over the distinct pairs.

    Returns:
        (i, j): Tensor[batch] (int64) each, ``i != j`` (requires ``num_chunks >= 2``).
    """
    dev = _device(generator, device)
    i = torch.randint(0, num_chunks, (batch,), generator=generator, device=dev)
    j = torch.randint(0, num_chunks - 1, (batch,), generator=generator, device=dev)
    return i, j + (j >= i).long()  # j is uniform over the positions other than i


def swap_index(
    batch: int,
    num_frames: int,
    generator: Optional[torch.Generator] = None,
    device=None,
    chunks: int = 4,
    build=None,
) -> torch.Tensor:
    """Index of the original shuffle negative: split time into ``chunks`` chunks, swap two distinct ones.

    The two chunk positions are drawn uniformly among distinct pairs, independently per sample (they
    need not be adjacent). Chunks of unequal length (T not divisible by ``chunks``) move whole, so the
    result is ``cat`` of the chunks with the two exchanged, as the original. With a single chunk (T = 1)
    there is nothing to swap and the index is the identity.

    Args:
        build: ``build(first, second, num_frames, chunks)`` makes the index from the drawn positions;
            default :func:`swap_index_from_pairs` (tensor ops; ``ops.swap_time_index`` is one kernel).

    Returns:
        Tensor[batch, num_frames] (int64).
    """
    dev = _device(generator, device)
    n = len(chunk_bounds(num_frames, chunks))
    if n < 2:
        return torch.arange(num_frames, device=dev).expand(batch, num_frames).contiguous()
    first, second = swap_pairs(batch, n, generator, dev)
    return (build or swap_index_from_pairs)(first, second, num_frames, chunks)


def swap_index_from_pairs(first: torch.Tensor, second: torch.Tensor, num_frames: int, chunks: int = 4) -> torch.Tensor:
    """The swap index for given chunk positions, in tensor ops only (the reference of the compiled
    ``swap_time_index``).

    Args:
        first, second (Tensor[B], int64): chunk positions in ``[0, n)``, ``n = len(chunk_bounds(T, chunks))``;
            equal positions leave the frames in order.
    Returns:
        Tensor[B, num_frames] (int64) on first's device.
    """
    dev = first.device
    bounds = chunk_bounds(num_frames, chunks)
    n = len(bounds)
    batch = first.shape[0]
    order = torch.arange(n, device=dev).expand(batch, n).clone()
    rows = torch.arange(batch, device=dev)
    order[rows, first] = second
    order[rows, second] = first
    # concatenate the chunks in the new order, with tensor ops only (no host round trip on a GPU):
    # output frame t lies in the q-th placed chunk, at offset t - (where that chunk starts in the output)
    # the chunk bounds made on the device (a host tensor copied over would wait for the device's queue)
    size = bounds[0][1]
    chunk_start = torch.arange(n, device=dev) * size
    start = chunk_start[order]  # [B, n] source start of each placed chunk
    length = (num_frames - chunk_start).clamp_(max=size)[order]
    end = length.cumsum(1)  # [B, n] output end of each placed chunk
    t = torch.arange(num_frames, device=dev)
    q = (t.view(1, -1, 1) >= end.unsqueeze(1)).sum(2)  # [B, T] placed chunk of each output frame
    return start.gather(1, q) + t - (end - length).gather(1, q)


def permute_index(batch: int, num_frames: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Index of a random non-identity permutation of the frames, per sample (identity when T = 1)."""
    dev = _device(generator, device)
    ident = torch.arange(num_frames, device=dev)
    out = torch.argsort(torch.rand(batch, num_frames, generator=generator, device=dev), dim=1)
    if num_frames < 2:
        return out
    bad = (out == ident).all(dim=1)
    while bool(bad.any()):  # redraw the rows that came out as the identity
        redo = torch.argsort(torch.rand(int(bad.sum()), num_frames, generator=generator, device=dev), dim=1)
        out[bad] = redo
        bad = (out == ident).all(dim=1)
    return out


def reverse_index(batch: int, num_frames: int, device=None) -> torch.Tensor:
    """Index of the time-reversed clip: ``T-1, ..., 0`` for every sample."""
    return torch.arange(num_frames - 1, -1, -1, device=device).expand(batch, num_frames).contiguous()


def shuffle_index(
    batch: int, num_frames: int, generator: Optional[torch.Generator] = None, mode: str = "swap", device=None
) -> torch.Tensor:
    """Index of the shuffle negative in one of :data:`SHUFFLE_MODES`."""
    if mode == "swap":
        return swap_index(batch, num_frames, generator, device)
    if mode == "permute":
        return permute_index(batch, num_frames, generator, device)
    if mode == "reverse":
        return reverse_index(batch, num_frames, _device(generator, device))
    raise ValueError(f"mode must be one of {SHUFFLE_MODES}, got {mode!r}")
