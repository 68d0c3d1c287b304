"""Shared test parameters: devices, dtypes and memory layouts, in one place."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_SPLITS = REPO.parent / "shared" / "splits"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CLIP_DTYPES = [torch.uint8] + FLOAT_DTYPES
# (feature dtype, bank dtype) pairs of the memory-bank ops
NCE_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]

# the trainer on tiny synthetic clips (4 frames, 32x32), for tests of whole training runs
TINY_TRAIN = ["--dataset", "synthetic", "--num-videos", "8", "--clip-len", "4", "--resize", "32", "32",
              "--crop-size", "32", "--batch-size", "4", "--nce-k", "5", "--workers", "0", "--no-progress",
              "--print-freq", "1", "--seed", "7"]

# error of a low-precision result against float64, allowed relative to the reference's own error
LOW_PRECISION_FACTOR = 2.0


@pytest.fixture(scope="module")
def one_thread():
    """Intra-op threads set to one for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny convolutions and small items gain nothing from threads, and on a busy machine the threads'
    barriers dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def at_thread_counts(fn, counts):
    """[fn() run with torch.set_num_threads(n) for n in counts]; the caller's thread count is restored."""
    threads = torch.get_num_threads()
    try:
        out = []
        for n in counts:
            torch.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(threads)


def make_clip(shape, dtype, device="cpu", layout="contiguous", generator=None):
    """A random clip [B, C, T, H, W] of the given dtype laid out in memory as ``layout``.

    ``sliced`` is a strided view into a larger buffer (every other row, an offset in time), and
    ``transposed`` a dense but non-standard permutation (H and W swapped in memory).
    """
    g = generator or torch.Generator().manual_seed(0)
    B, C, T, H, W = shape
    if layout == "sliced":
        big = _rand((B, C, T + 2, 2 * H, W + 3), dtype, g)
        x = big[:, :, 1 : T + 1, ::2, 2 : W + 2]
    elif layout == "transposed":
        x = _rand((B, C, T, W, H), dtype, g).transpose(3, 4)
    else:
        x = _rand(shape, dtype, g)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    return x.to(device)


def _rand(shape, dtype, g):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


def tolerance(dtype):
    """(rtol, atol) for comparing an op against the reference computed in the same dtype."""
    return {
        torch.float16: (1e-3, 2e-3),
        torch.bfloat16: (1e-2, 1.6e-2),
        torch.float32: (1e-5, 1e-6),
        torch.float64: (1e-12, 1e-12),
    }.get(dtype, (1e-6, 1e-6))


@pytest.fixture
def seed():
    torch.manual_seed(int(os.environ.get("IIC_TEST_SEED", "0")))
    return 0
