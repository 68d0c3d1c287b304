"""NCE memory-bank operators: scores against sampled bank rows, and the momentum update of the bank.

Thin wrappers over ``torch.ops.iic_ext.*`` with their fake (meta) kernels; the autograd formulas are
registered in C++ (csrc/autograd.cpp). When the compiled library is missing they run the pure-PyTorch reference (and warn once). The banks are
constant buffers: scores are differentiable with respect to the features only.
"""
import ctypes
import sys
from typing import Optional, Tuple

import torch

from . import reference
from ._library import HAS_C, use_compiled


# Transparent huge pages for large CPU banks. The ops read bank rows at random; with 4 KB pages every
# row of a bank much larger than the TLB's reach (a few MB) costs a page walk, and the walks, not the
# memory, bound the gather. Allocations of 32 MiB and more are always a mapping of their own (glibc's
# mmap threshold is capped there), so advising one touches no other memory.
_HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14
_madvise = None


def _advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of ``t``'s memory with transparent huge pages
    (``madvise(MADV_HUGEPAGE)``), which takes effect for pages first touched afterwards. Returns whether
    the advice was given: never for non-CPU tensors, tensors under :data:`HUGE_PAGE_MIN_BYTES` or other
    systems; a kernel without transparent huge pages (or with them set to ``never``) ignores it."""
    global _madvise
    storage = t.untyped_storage()
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or storage.nbytes() < HUGE_PAGE_MIN_BYTES:
        return False
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            fn = False
        else:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
        _madvise = fn
    if not _madvise:
        return False
    start = storage.data_ptr()
    begin = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (start + storage.nbytes()) // _HUGE_PAGE * _HUGE_PAGE
    return end > begin and _madvise(begin, end - begin, _MADV_HUGEPAGE) == 0


def empty_bank(
    n: int, d: int, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None
) -> torch.Tensor:
    """An uninitialised memory bank ``[n, d]`` for the ops below (fill it before use).

    On Linux a CPU bank of 32 MiB or more is backed by transparent huge pages where the kernel allows
    it (advised before any page is touched). The ops read bank rows at random, and with 4 KB pages each
    row of a large bank costs a page walk: at 1.28M rows of 128 floats the fused loss went from 90-100
    to 60-82 ms per call on a 2-core Xeon. Otherwise it is ``torch.empty``.
    """
    bank = torch.empty(n, d, dtype=dtype, device=device)
    _advise_huge_pages(bank)
    return bank


def bank_scores(feat: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``scores[b, k] = <bank[idx[b, k]], feat[b]>`` without materialising the sampled rows.

    Args:
        feat (Tensor[B, D]): float16, bfloat16, float32 or float64, any strides.
        bank (Tensor[N, D]): float16, bfloat16, float32 or float64 (a constant buffer: no gradient).
        idx (Tensor[B, K], int64): rows of the bank, in ``[0, N)``.

    Returns:
        Tensor[B, K] in feat's dtype, accumulated in float32 (float64 when feat or bank is float64).
        Differentiable with respect to feat.
    """
    if use_compiled():
        return torch.ops.iic_ext.bank_scores(feat, bank, idx)
    return reference.bank_scores(feat, bank, idx)


def iic_scores(
    l: torch.Tensor,
    ab: torch.Tensor,
    bank_l: torch.Tensor,
    bank_ab: torch.Tensor,
    bank_neg: Optional[torch.Tensor],
    idx: torch.Tensor,
    inv_t: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two-view IIC logits in one op; each sampled row of the negative bank is read once.

    ``out_l = [bank_ab[idx] | bank_neg[idx]] . l * inv_t`` and
    ``out_ab = [bank_l[idx] | bank_neg[idx]] . ab * inv_t``; without ``bank_neg`` the CMC form.

    Args:
        l, ab (Tensor[B, D]): the two views' features (same dtype).
        bank_l, bank_ab (Tensor[N, D]): memory banks of the two views (same dtype).
        bank_neg (Tensor[N, D] or None): the intra-negative bank.
        idx (Tensor[B, K+1], int64): sampled rows, column 0 the positive.
        inv_t: 1 / temperature.

    Returns:
        (out_l, out_ab): Tensor[B, 2(K+1)] each ([B, K+1] without bank_neg), in l's dtype.
        Differentiable with respect to l and ab.
    """
    if use_compiled():
        return torch.ops.iic_ext.iic_scores(l, ab, bank_l, bank_ab, bank_neg, idx, float(inv_t))
    return reference.iic_scores(l, ab, bank_l, bank_ab, bank_neg, idx, float(inv_t))


def iic_softmax_loss(
    l: torch.Tensor,
    ab: torch.Tensor,
    bank_l: torch.Tensor,
    bank_ab: torch.Tensor,
    bank_neg: Optional[torch.Tensor],
    idx: torch.Tensor,
    inv_t: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample softmax cross-entropy (label 0) of the two views' IIC logits, in one pass.

    The same value as ``F.cross_entropy(out, 0, reduction="none")`` on each output of
    :func:`iic_scores`, and the gradient comes out of the same call, so the backward only scales the
    saved gradient. On the CPU the logits are never stored: an online softmax runs over the sampled
    rows (each touched row read once). On CUDA it is the scores kernel, ``log_softmax`` and the scores'
    backward kernel, in one C++ call.

    Args:
        l, ab (Tensor[B, D]): the two views' features (same dtype).
        bank_l, bank_ab (Tensor[N, D]): memory banks of the two views (same dtype).
        bank_neg (Tensor[N, D] or None): the intra-negative bank (None: the CMC form).
        idx (Tensor[B, K+1], int64): sampled rows, column 0 the positive.
        inv_t: 1 / temperature.

    Returns:
        (loss_l, loss_ab): Tensor[B] each, float32 (float64 when l or the banks are float64).
        Differentiable with respect to l and ab. ``exp(-loss)`` is the positive's softmax probability.
    """
    if use_compiled():
        loss_l, loss_ab, _, _ = torch.ops.iic_ext.iic_softmax_loss(l, ab, bank_l, bank_ab, bank_neg, idx, float(inv_t))
        return loss_l, loss_ab
    return reference.iic_softmax_loss(l, ab, bank_l, bank_ab, bank_neg, idx, float(inv_t))


def bank_update_(bank: torch.Tensor, idx: torch.Tensor, feat: torch.Tensor, momentum: float) -> torch.Tensor:
    """``bank[y] = normalize(m * bank[y] + (1 - m) * feat[b])`` for ``y = idx[b]``, in place, one pass.

    Every update reads the row as it was before the call; when a row appears several times in
    ``idx`` the last occurrence is written (what ``index_copy_`` does on the CPU), on every device.
    No epsilon in the normalisation, as the original.

    Args:
        bank (Tensor[N, D]): updated in place (float16, bfloat16, float32 or float64).
        idx (Tensor[B], int64): rows to update.
        feat (Tensor[B, D]): new features (any float dtype; gradients are not tracked).
        momentum: m.

    Returns:
        bank.
    """
    if use_compiled():
        torch.ops.iic_ext.bank_update_(bank, idx, feat.detach(), float(momentum))
        return bank
    return reference.bank_update_(bank, idx, feat, float(momentum))


# ---- fake kernels and autograd ---------------------------------------------------------------------


def _same_device(*named):
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise RuntimeError(
                f"{first_name} and {name} must be on the same device, got {first.device} and {t.device}"
            )


if HAS_C:

    @torch.library.register_fake("iic_ext::bank_scores")
    def _bank_scores_fake(feat, bank, idx):
        _same_device(("feat", feat), ("bank", bank), ("idx", idx))
        return feat.new_empty((feat.shape[0], idx.shape[1]))

    @torch.library.register_fake("iic_ext::_bank_scores_backward")
    def _bank_scores_backward_fake(grad, bank, idx, dtype):
        _same_device(("grad", grad), ("bank", bank), ("idx", idx))
        return grad.new_empty((grad.shape[0], bank.shape[1]), dtype=dtype)

    @torch.library.register_fake("iic_ext::iic_scores")
    def _iic_scores_fake(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t=1.0):
        _same_device(("l", l), ("ab", ab), ("bank_l", bank_l), ("bank_ab", bank_ab), ("bank_neg", bank_neg), ("idx", idx))
        cols = idx.shape[1] * (2 if bank_neg is not None else 1)
        return l.new_empty((l.shape[0], cols)), l.new_empty((l.shape[0], cols))

    @torch.library.register_fake("iic_ext::_iic_scores_backward")
    def _iic_scores_backward_fake(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, inv_t, dtype):
        _same_device(
            ("grad_l", grad_l), ("grad_ab", grad_ab), ("bank_l", bank_l), ("bank_ab", bank_ab), ("bank_neg", bank_neg),
            ("idx", idx),
        )
        shape = (grad_l.shape[0], bank_l.shape[1])
        return grad_l.new_empty(shape, dtype=dtype), grad_l.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("iic_ext::_iic_softmax_loss_unfused")
    @torch.library.register_fake("iic_ext::iic_softmax_loss")
    def _iic_softmax_loss_fake(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t=1.0):
        _same_device(("l", l), ("ab", ab), ("bank_l", bank_l), ("bank_ab", bank_ab), ("bank_neg", bank_neg), ("idx", idx))
        dt = torch.float64 if torch.float64 in (l.dtype, bank_l.dtype) else torch.float32
        B, D = l.shape
        return l.new_empty((B,), dtype=dt), l.new_empty((B,), dtype=dt), l.new_empty((B, D), dtype=dt), l.new_empty((B, D), dtype=dt)

    @torch.library.register_fake("iic_ext::bank_update_")
    def _bank_update_fake(bank, idx, feat, momentum):
        _same_device(("bank", bank), ("idx", idx), ("feat", feat))
        return None
