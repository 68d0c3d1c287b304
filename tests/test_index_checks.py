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


def _aminmax_calls(fn):
    """How many range checks (aten::aminmax reductions) run during fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::aminmax")


def _index_ops():
    """Name -> (forward returning a scalar to differentiate, the inputs requiring grad)."""
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 3, 6, 4, 4, generator=g, requires_grad=True)
    time_index = torch.randint(0, 6, (2, 6), generator=g)
    banks = [torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1) for _ in range(3)]
    l, ab = torch.randn(2, 4, 8, generator=g).requires_grad_()
    idx = torch.randint(0, 50, (4, 7), generator=g)
    return {
        "temporal_gather": (lambda: ops.temporal_gather(clip, time_index).sum(), (clip,)),
        "bank_scores": (lambda: ops.bank_scores(l, banks[0], idx).sum(), (l,)),
        "iic_scores": (lambda: sum(o.sum() for o in ops.iic_scores(l, ab, *banks, idx, 2.0)), (l, ab)),
        "iic_softmax_loss": (lambda: sum(o.sum() for o in ops.iic_softmax_loss(l, ab, *banks, idx, 2.0)[:2]), (l, ab)),
    }


@pytest.mark.parametrize("name", ["temporal_gather", "bank_scores", "iic_scores", "iic_softmax_loss"])
def test_backward_does_not_check_indices_again(name):
    """The forward checks its index argument once; the backward kernel gets the same (saved, unchanged)
    tensor and skips the check, which on a GPU would be a second synchronisation."""
    fn, inputs = _index_ops()[name]
    out = []
    assert _aminmax_calls(lambda: out.append(fn())) == 1
    assert _aminmax_calls(lambda: torch.autograd.grad(out[0], inputs)) == 0
    # called directly, the backward kernel checks its idx like every op
    if name == "iic_scores":
        g = torch.randn(4, 14)
        bl = torch.randn(50, 8)
        with pytest.raises(RuntimeError, match="idx has an entry out of range"):
            torch.ops.iic_ext._iic_scores_backward(g, g, bl, bl, bl, torch.full((4, 7), 50), 1.0, torch.float32)


def test_index_changed_in_place_after_forward_is_refused():
    """What lets the backward skip the check: autograd refuses a saved index tensor changed in place."""
    l = torch.randn(2, 8, requires_grad=True)
    bank = torch.randn(10, 8)
    idx = torch.randint(0, 10, (2, 3))
    s = ops.bank_scores(l, bank, idx)
    idx[0, 0] = 99
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


def test_unfused_loss_checks_its_index_once():
    g = torch.Generator().manual_seed(0)
    banks = [torch.randn(50, 8, generator=g) for _ in range(3)]
    l, ab = torch.randn(2, 4, 8, generator=g)
    idx = torch.randint(0, 50, (4, 7), generator=g)
    assert _aminmax_calls(lambda: torch.ops.iic_ext._iic_softmax_loss_unfused(l, ab, *banks, idx, 2.0)) == 1
    with pytest.raises(RuntimeError, match="idx has an entry out of range"):
        torch.ops.iic_ext._iic_softmax_loss_unfused(l, ab, *banks, torch.full((4, 7), 50), 2.0)
