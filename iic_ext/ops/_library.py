"""Loads the compiled operator library, or records why it could not be loaded."""
import warnings

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
