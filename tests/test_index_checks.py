"""The switch for range checks of GPU index arguments (iic_ext.ops.unchecked_indices)."""
import pytest
import torch

from iic_ext import ops

pytestmark = pytest.mark.skipif(not ops.HAS_C, reason="compiled iic_ext._C not built")


def _setting():
    previous = torch.ops.iic_ext._set_gpu_index_checks(True)
    torch.ops.iic_ext._set_gpu_index_checks(previous)
    return previous


def test_switch_nests_and_restores():
    assert _setting() is True
    with ops.unchecked_indices():
        assert _setting() is False
        with ops.unchecked_indices():
            assert _setting() is False
        assert _setting() is False
    assert _setting() is True
    with pytest.raises(ValueError):
        with ops.unchecked_indices():
            raise ValueError("inside")
    assert _setting() is True


def test_cpu_indices_are_checked_regardless():
    clip = torch.rand(2, 3, 4, 5, 5)
    bank, f = torch.randn(10, 8), torch.randn(2, 8)
    with ops.unchecked_indices():
        with pytest.raises(RuntimeError, match="time_index has an entry out of range"):
            ops.temporal_gather(clip, torch.full((2, 4), 4))
        with pytest.raises(RuntimeError, match="idx has an entry out of range"):
            ops.iic_scores(f, f, bank, bank, bank, torch.full((2, 3), 10), 1.0)
        with pytest.raises(RuntimeError, match="idx has a negative entry"):
            ops.bank_update_(bank, torch.tensor([0, -1]), f, 0.5)
