"""NCEAverage and the losses against a module written the original way (index_select + bmm + index_copy_)."""
import math
import os

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from iic_ext.nce import NCEAverage, NCECriterion, NCESoftmaxLoss, positive_prob
from iic_ext.ops import empty_bank
from iic_ext.ops.nce import _advise_huge_pages

N, D, K, B = 50, 24, 20, 6


class OriginalNCEAverage(nn.Module):
    """The original lib/NCEAverage.py (NCEAverage, and NCEAverage_ori without the negative bank),
    device-agnostic, taking idx explicitly."""

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5, use_softmax=False, intra_neg=True):
        super().__init__()
        self.K, self.use_softmax, self.intra_neg = K, use_softmax, intra_neg
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(inputSize / 3)
        self.register_buffer("memory_l", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_ab", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        if intra_neg:
            self.register_buffer("memory_neg", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))

    @staticmethod
    def _update(memory, y, feat, momentum):
        pos = torch.index_select(memory, 0, y.view(-1))
        pos.mul_(momentum)
        pos.add_(torch.mul(feat, 1 - momentum))
        norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
        memory.index_copy_(0, y, pos.div(norm))

    def forward(self, l, ab, neg, y, idx):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_l, Z_ab = self.params[2].item(), self.params[3].item()
        momentum = self.params[4].item()
        bs, n_rows, dim = l.size(0), self.memory_l.size(0), self.memory_l.size(1)
        w_l = torch.index_select(self.memory_l, 0, idx.view(-1)).detach().view(bs, K + 1, dim)
        w_ab = torch.index_select(self.memory_ab, 0, idx.view(-1)).detach().view(bs, K + 1, dim)
        if self.intra_neg:
            w_neg = torch.index_select(self.memory_neg, 0, idx.view(-1)).detach().view(bs, K + 1, dim)
            w_l = torch.cat((w_l, w_neg), 1)
            w_ab = torch.cat((w_ab, w_neg), 1)
        out_ab = torch.bmm(w_l, ab.view(bs, dim, 1))
        out_l = torch.bmm(w_ab, l.view(bs, dim, 1))
        if self.use_softmax:
            out_ab, out_l = torch.div(out_ab, T).contiguous(), torch.div(out_l, T).contiguous()
        else:
            out_ab, out_l = torch.exp(torch.div(out_ab, T)), torch.exp(torch.div(out_l, T))
            if Z_l < 0:
                self.params[2] = out_l.mean() * n_rows
                Z_l = self.params[2].clone().detach().item()
            if Z_ab < 0:
                self.params[3] = out_ab.mean() * n_rows
                Z_ab = self.params[3].clone().detach().item()
            out_l, out_ab = torch.div(out_l, Z_l).contiguous(), torch.div(out_ab, Z_ab).contiguous()
        with torch.no_grad():
            self._update(self.memory_l, y, l, momentum)
            self._update(self.memory_ab, y, ab, momentum)
            if self.intra_neg:
                self._update(self.memory_neg, y, neg, momentum)
        return out_l, out_ab


def original_softmax_loss(x):
    x = x.squeeze()
    return nn.CrossEntropyLoss()(x, torch.zeros([x.shape[0]], dtype=torch.long))


def original_nce_loss(x, n_data):
    eps = 1e-7
    bsz, m = x.shape[0], x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


def _pair(use_softmax, intra_neg, dtype=torch.float32):
    torch.manual_seed(0)
    ref = OriginalNCEAverage(D, N, K, 0.07, 0.5, use_softmax, intra_neg).to(dtype)
    ours = NCEAverage(D, N, K, 0.07, 0.5, use_softmax=use_softmax, intra_neg=intra_neg, generator=torch.Generator().manual_seed(1))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.to(dtype)
    return ref, ours


def _step_inputs(step, gen, dtype=torch.float32):
    y = torch.randint(0, N, (B,), generator=gen)
    y[1] = y[0]  # a repeated sample in the batch: the last occurrence updates the banks
    idx = torch.randint(0, N, (B, K + 1), generator=gen)
    idx[:, 0] = y
    idx[2, 3] = y[4]  # another sample's positive drawn as a negative
    net = torch.randn(3, D, D, generator=gen, dtype=torch.float64).to(dtype) / math.sqrt(D)
    x = torch.randn(3, B, D, generator=gen, dtype=torch.float64).to(dtype)
    return y, idx, net, x


@pytest.mark.parametrize("use_softmax", [True, False])
@pytest.mark.parametrize("intra_neg", [True, False])
def test_module_matches_original_step_by_step(use_softmax, intra_neg):
    ref, ours = _pair(use_softmax, intra_neg)
    gen = torch.Generator().manual_seed(7)
    crit = NCESoftmaxLoss() if use_softmax else NCECriterion(N)
    ref_crit = original_softmax_loss if use_softmax else (lambda x: original_nce_loss(x, N))
    for step in range(4):
        y, idx, net, x = _step_inputs(step, gen)
        results = []
        for module, loss_fn in ((ref, ref_crit), (ours, crit)):
            w = net.clone().requires_grad_()
            l, ab, neg = (x[i] @ w[i] for i in range(3))
            if intra_neg:
                out_l, out_ab = module(l, ab, neg.detach(), y, idx)
            else:
                out_l, out_ab = module(l, ab, y, idx) if module is ours else module(l, ab, None, y, idx)
            loss = loss_fn(out_l) + loss_fn(out_ab)
            loss.backward()
            results.append((out_l.detach(), out_ab.detach(), loss.detach(), w.grad))
        (rl, rab, rloss, rgrad), (ol, oab, oloss, ograd) = results
        assert ol.shape == rl.shape and ol.dtype == rl.dtype
        assert_close(ol, rl, rtol=1e-4, atol=1e-5)
        assert_close(oab, rab, rtol=1e-4, atol=1e-5)
        assert_close(oloss, rloss, rtol=1e-5, atol=1e-5)
        # the gradient sees the banks as they were before this step's update (as the original's copies)
        assert_close(ograd, rgrad, rtol=1e-4, atol=1e-5)
        for name, buf in ref.named_buffers():
            assert_close(getattr(ours, name), buf, rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
    if not use_softmax:
        assert ours.params[2] > 0 and ours.params[3] > 0


@pytest.mark.parametrize("intra_neg", [True, False])
def test_softmax_losses_match_original_step_by_step(intra_neg):
    # the fused loss path: per-sample losses whose mean is the original's loss, same gradients and banks
    ref, ours = _pair(True, intra_neg)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        y, idx, net, x = _step_inputs(step, gen)
        w_ref, w_ours = net.clone().requires_grad_(), net.clone().requires_grad_()
        l, ab, neg = (x[i] @ w_ref[i] for i in range(3))
        out_l, out_ab = ref(l, ab, neg.detach(), y, idx)
        ref_l, ref_ab = original_softmax_loss(out_l), original_softmax_loss(out_ab)
        (ref_l + ref_ab).backward()
        l, ab, neg = (x[i] @ w_ours[i] for i in range(3))
        args = (l, ab, neg.detach(), y) if intra_neg else (l, ab, y)
        per_l, per_ab = ours.softmax_losses(*args, idx=idx)
        assert per_l.shape == per_ab.shape == (B,)
        (per_l.mean() + per_ab.mean()).backward()
        assert_close(per_l.mean(), ref_l.detach(), rtol=1e-5, atol=1e-5)
        assert_close(per_ab.mean(), ref_ab.detach(), rtol=1e-5, atol=1e-5)
        assert_close(w_ours.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
        for name, buf in ref.named_buffers():
            assert_close(getattr(ours, name), buf, rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")


def test_softmax_losses_without_fused_kernel(monkeypatch):
    # where no fused loss kernel exists (CUDA), softmax_losses is forward's logits + cross-entropy
    import iic_ext.nce as nce_module

    results = []
    for fused in (True, False):
        monkeypatch.setattr(nce_module, "HAS_C", fused)
        _, ours = _pair(True, True)
        gen = torch.Generator().manual_seed(5)
        steps = []
        for step in range(3):
            y, idx, net, x = _step_inputs(step, gen)
            w = net.clone().requires_grad_()
            l, ab, neg = (x[i] @ w[i] for i in range(3))
            per_l, per_ab = ours.softmax_losses(l, ab, neg.detach(), y, idx=idx)
            (per_l.mean() + 2 * per_ab.mean()).backward()
            steps.append((per_l.detach(), per_ab.detach(), w.grad, ours.memory_neg.clone()))
        results.append(steps)
    for a, b in zip(*results):
        for u, v in zip(a, b):
            assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_softmax_losses_need_softmax():
    _, ours = _pair(False, True)
    with pytest.raises(ValueError, match="use_softmax"):
        ours.softmax_losses(torch.randn(B, D), torch.randn(B, D), torch.randn(B, D), torch.arange(B))


def test_original_state_dict_loads_strict():
    for intra_neg, keys in ((True, {"params", "memory_l", "memory_ab", "memory_neg"}), (False, {"params", "memory_l", "memory_ab"})):
        ref = OriginalNCEAverage(D, N, K, intra_neg=intra_neg)
        ref.params[2] = 123.0
        ours = NCEAverage(D, N, K, intra_neg=intra_neg)
        assert set(ours.state_dict()) == keys
        ours.load_state_dict(ref.state_dict(), strict=True)
        for k in keys:
            assert torch.equal(ours.state_dict()[k], ref.state_dict()[k])
    m = NCEAverage(512, 100)
    stdv = 1 / math.sqrt(512 / 3)
    assert m.params.tolist()[:4] == pytest.approx([1024, 0.07, -1, -1]) and m.params[4].item() == 0.5
    assert m.memory_l.abs().max() <= stdv and m.memory_neg.shape == (100, 512)


def _vm_flags(address):
    """The VmFlags of the mapping of this process that holds ``address`` (Linux)."""
    span = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                span = (lo, hi)
            elif line.startswith("VmFlags:") and span[0] <= address < span[1]:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_initial_banks_are_the_original_draws_at_every_size():
    # above HUGE_PAGE_MIN_BYTES per bank (empty_bank advises those) and below it
    for n, d in ((N, D), ((32 << 20) // (4 * 128) + 7, 128)):
        torch.manual_seed(11)
        ref = OriginalNCEAverage(d, n, K)
        torch.manual_seed(11)
        ours = NCEAverage(d, n, K)
        for k in ("memory_l", "memory_ab", "memory_neg"):
            assert torch.equal(getattr(ours, k), getattr(ref, k))


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="needs Linux with transparent huge pages")
def test_large_cpu_banks_are_advised_huge_pages():
    n = (32 << 20) // (4 * 128) + 7  # just over 32 MiB of float32 rows
    m = NCEAverage(128, n, K)
    for bank in (m.memory_l, m.memory_ab, m.memory_neg):
        assert "hg" in _vm_flags(bank.data_ptr() + (4 << 20))  # madvise(MADV_HUGEPAGE) on its interior
    bank = empty_bank(n, 128, dtype=torch.float64)
    assert bank.shape == (n, 128) and bank.dtype == torch.float64
    assert "hg" in _vm_flags(bank.data_ptr() + (4 << 20))
    small = empty_bank(100, 16)
    assert small.shape == (100, 16) and small.dtype == torch.float32
    assert not _advise_huge_pages(small)  # under 32 MiB: may share its mapping with other memory


def test_generator_makes_idx_reproducible():
    y = torch.tensor([3, 7, 7, 0])
    a = NCEAverage(D, N, K, generator=torch.Generator().manual_seed(5))
    b = NCEAverage(D, N, K)
    b.seed(5)
    ia, ib = a.sample_idx(y), b.sample_idx(y)
    assert torch.equal(ia, ib) and ia.shape == (4, K + 1) and torch.equal(ia[:, 0], y)
    assert ia.min() >= 0 and ia.max() < N
    state = a.generator.get_state()
    first = a.sample_idx(y)
    a.generator.set_state(state)
    assert torch.equal(a.sample_idx(y), first)
    assert not torch.equal(a.sample_idx(y), first)


def test_forward_draws_from_generator():
    ref, ours = _pair(True, True)
    y = torch.arange(B)
    l, ab, neg = torch.randn(3, B, D).unbind(0)
    state = ours.generator.get_state()
    idx = ours.sample_idx(y)
    ours.generator.set_state(state)
    banks = {k: v.clone() for k, v in ours.state_dict().items()}
    out_l, out_ab = ours(l, ab, neg, y)
    exp_l, exp_ab = ref(l, ab, neg, y, idx)
    assert_close(out_l, exp_l)
    ours.load_state_dict(banks)


def test_backward_after_another_forward_raises():
    _, ours = _pair(True, True)
    y = torch.arange(B)
    l = torch.randn(B, D, requires_grad=True)
    out1 = ours(l, l * 2, torch.randn(B, D), y)
    ours(l, l * 2, torch.randn(B, D), y)
    with pytest.raises(RuntimeError, match="another forward"):
        NCESoftmaxLoss()(out1[0]).backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_low_precision_features(dtype):
    ref, ours = _pair(True, True)
    gen = torch.Generator().manual_seed(3)
    y, idx, net, x = _step_inputs(0, gen)
    l, ab, neg = (x[i] @ net[i] for i in range(3))
    exp_l, exp_ab = ref(l, ab, neg, y, idx)
    w = net.to(dtype).requires_grad_()
    l, ab, neg = (x[i].to(dtype) @ w[i] for i in range(3))
    out_l, out_ab = ours(l, ab, neg, y, idx)
    assert out_l.dtype == dtype and ours.memory_l.dtype == torch.float32
    assert_close(out_l.float(), exp_l, rtol=0.05, atol=0.3)
    (NCESoftmaxLoss()(out_l) + NCESoftmaxLoss()(out_ab)).backward()
    assert w.grad.dtype == dtype and torch.isfinite(w.grad.float()).all()
    for name, buf in ref.named_buffers():
        assert_close(getattr(ours, name), buf, rtol=0, atol=0.02)


def test_module_nce_path_half_features_no_overflow():
    _, ours = _pair(False, True)
    y = torch.arange(B)
    l = torch.nn.functional.normalize(torch.randn(B, D), dim=1).half() * 4
    out_l, out_ab = ours(l, l, l, y)
    assert out_l.dtype == torch.float32 and torch.isfinite(out_l).all()


def test_losses_match_original():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2 * K + 2, 1, generator=g)
    assert_close(NCESoftmaxLoss()(x), original_softmax_loss(x))
    assert_close(NCESoftmaxLoss()(x.squeeze(-1)), original_softmax_loss(x))
    p = torch.rand(5, K + 1, 1, generator=g) * 1e-2
    ours, orig = NCECriterion(N)(p), original_nce_loss(p, N)
    assert ours.shape == orig.shape == (1,)
    assert_close(ours, orig)
    assert_close(NCECriterion(N)(p.squeeze(-1)), orig)
    # batch of one: the original's squeeze() drops the batch too; here it works
    one = torch.randn(1, 7, 1, generator=g)
    assert_close(NCESoftmaxLoss()(one), torch.nn.functional.cross_entropy(one[:, :, 0], torch.zeros(1, dtype=torch.long)))


def test_positive_prob():
    x = torch.randn(4, 9, 1)
    p = positive_prob(x)
    assert p.shape == (4,)
    assert_close(p, torch.softmax(x[:, :, 0], 1)[:, 0])
    assert_close(positive_prob(x[:, :, 0].bfloat16()), p, rtol=0.02, atol=0.01)


def test_forward_signature_errors():
    ours = NCEAverage(D, N, K, intra_neg=True)
    with pytest.raises(TypeError, match="neg"):
        ours(torch.randn(2, D), torch.randn(2, D), torch.arange(2))
    cmc = NCEAverage(D, N, K, intra_neg=False)
    out_l, out_ab = cmc(torch.randn(2, D), torch.randn(2, D), torch.arange(2))
    assert out_l.shape == (2, K + 1, 1)


def test_hyperparams_follow_the_params_buffer():
    """The host copy of ``params`` is refreshed whenever the buffer changes."""
    m = NCEAverage(8, 20, nce_k=5, nce_t=0.1, nce_m=0.5, use_softmax=False, generator=torch.Generator().manual_seed(0))
    assert m.hyperparams() == pytest.approx([5, 0.1, -1, -1, 0.5])
    other = NCEAverage(8, 20, nce_k=7, nce_t=0.2, nce_m=0.9)
    m.load_state_dict(other.state_dict())
    assert m.hyperparams() == pytest.approx([7, 0.2, -1, -1, 0.9])
    f = torch.randn(3, 8)
    m(f, f, f, torch.tensor([0, 1, 2]))  # the NCE form sets Z from the first batch
    z = m.params[2:4].tolist()
    assert z[0] > 0 and m.hyperparams()[2:4] == pytest.approx(z)
    m.params[4] = 0.25
    assert m.hyperparams()[4] == pytest.approx(0.25)
    m.double()
    assert m.hyperparams()[4] == pytest.approx(0.25)
