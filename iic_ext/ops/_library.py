"""Loads the compiled operator library, or records why it could not be loaded."""
import contextlib
import warnings

import torch

try:
    from iic_ext import _C  # noqa: F401  (loading the library registers torch.ops.iic_ext.*)

    HAS_C = True
    LOAD_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the build
    HAS_C = False
    LOAD_ERROR = e

_warned = False


def use_compiled() -> bool:
    """True when torch.ops.iic_ext is available; warns once when the reference must stand in."""
    global _warned
    if not HAS_C and not _warned:
        warnings.warn(
            f"iic_ext: the compiled operators could not be loaded ({LOAD_ERROR}); falling back to the "
            "pure-PyTorch reference (correct but slower). Build with `pip install --no-build-isolation .`",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned = True
    return HAS_C


@contextlib.contextmanager
def unchecked_indices():
    """Within the block, index arguments on a GPU are not range-checked.

    Every op that takes indices (``time_index``, ``idx``) checks by default that they lie in range, and
    raises an error naming the argument if not. On a GPU that check is a reduction whose result the
    host must read: one device synchronisation per call, which stalls the queue of a training step.
    Code whose indices are valid by construction (the trainer draws them itself) can skip it here; an
    out-of-range index then reads or writes out of bounds. CPU indices are always checked (there it
    costs no synchronisation). Nests; restores the previous setting on exit. The setting is global
    (all threads).
    """
    if not HAS_C:
        yield
        return
    previous = torch.ops.iic_ext._set_gpu_index_checks(False)
    try:
        yield
    finally:
        torch.ops.iic_ext._set_gpu_index_checks(previous)
