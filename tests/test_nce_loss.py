"""The fused softmax loss (iic_softmax_loss) against cross-entropy on the reference logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import NCE_DTYPES, at_thread_counts
from iic_ext.ops import HAS_C, iic_softmax_loss, reference

pytestmark = pytest.mark.skipif(not HAS_C, reason="compiled iic_ext._C not built")

DTYPES = NCE_DTYPES + [(torch.float32, torch.float64)]
# (B, K+1, D, N). Above one draw per bank row the draws are grouped by row, else gathered per sample
# (in blocks of 512 draws, so K+1 > 512 exercises the merge of partial softmax states); above eight,
# with banks in the sums' dtype, the GEMM plan of iic_scores computes the loss ((4, 600, 33, 97)).
ROWS_SHAPES = [(16, 64, 128, 300), (8, 30, 19, 100), (3, 3, 1, 5), (4, 600, 33, 97)]
GATHER_SHAPES = [(4, 5, 37, 1000), (2, 1300, 33, 10000), (1, 1, 16, 10), (5, 3, 130, 64)]
SHAPES = ROWS_SHAPES + GATHER_SHAPES


def _inputs(B, K1, D, N, fdt=torch.float32, bdt=torch.float32, neg=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    l = (scale * torch.randn(B, D, generator=g, dtype=torch.float64)).to(fdt)
    ab = (scale * torch.randn(B, D, generator=g, dtype=torch.float64)).to(fdt)
    banks = [F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(bdt) for _ in range(3)]
    idx = torch.randint(0, N, (B, K1), generator=g)
    return l, ab, banks[0], banks[1], banks[2] if neg else None, idx


def _loss_and_grads(fn, l, ab, banks, idx, inv_t, weights):
    l, ab = l.clone().requires_grad_(), ab.clone().requires_grad_()
    loss_l, loss_ab = fn(l, ab, *banks, idx, inv_t)
    total = (loss_l * weights[0]).sum() + (loss_ab * weights[1]).sum()
    gl, gab = torch.autograd.grad(total, (l, ab))
    return loss_l.detach(), loss_ab.detach(), gl, gab


@pytest.mark.parametrize("fdt,bdt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("neg", [True, False])
def test_matches_cross_entropy_of_reference_logits(fdt, bdt, shape, neg):
    l, ab, bl, bab, bneg, idx = _inputs(*shape, fdt, bdt, neg)
    inv_t = 1 / 0.07
    B = shape[0]
    acc = torch.float64 if torch.float64 in (fdt, bdt) else torch.float32
    w = torch.rand(2, B, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(acc).double()
    got = _loss_and_grads(iic_softmax_loss, l, ab, (bl, bab, bneg), idx, inv_t, w.to(acc))
    assert got[0].dtype == got[1].dtype == acc and got[0].shape == (B,)
    assert got[2].dtype == got[3].dtype == fdt and got[2].shape == l.shape
    # exact: the same inputs (rounded to their dtypes) in float64
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want = _loss_and_grads(reference.iic_softmax_loss, l.double(), ab.double(), (d(bl), d(bab), d(bneg)), idx, inv_t, w)
    # the op accumulates in float32 unless something is float64; gradients then round to fdt
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    for a, b in zip(got[:2], want[:2]):
        assert_close(a.double(), b, rtol=tol[acc] * 10, atol=tol[acc] * 10)
    for a, b in zip(got[2:], want[2:]):
        assert_close(a.double(), b, rtol=tol[fdt] * 10, atol=tol[fdt] * 10 * inv_t)


@pytest.mark.parametrize("shape", [ROWS_SHAPES[0], ROWS_SHAPES[3], GATHER_SHAPES[1]])
def test_large_logits_do_not_overflow(shape):
    # unnormalised features at T = 0.07 give logits in the hundreds (the original's first steps)
    l, ab, bl, bab, bneg, idx = _inputs(*shape, scale=4.0)
    inv_t = 1 / 0.07
    got = _loss_and_grads(iic_softmax_loss, l, ab, (bl, bab, bneg), idx, inv_t, torch.ones(2, shape[0]))
    want = _loss_and_grads(reference.iic_softmax_loss, l.double(), ab.double(), (bl.double(), bab.double(), bneg.double()),
                           idx, inv_t, torch.ones(2, shape[0], dtype=torch.float64))
    assert all(torch.isfinite(t).all() for t in got)
    assert got[0].abs().max() > 50  # the regime is really the large-logit one
    for a, b in zip(got, want):
        assert_close(a.double(), b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("neg", [True, False])
def test_plans_agree(neg):
    """The same banks padded with rows nobody draws move the loss from the GEMM plan (16 draws per row)
    to the one-pass kernel over rows grouped by row (4) and to the one gathering rows per sample."""
    l, ab, bl, bab, bneg, idx = _inputs(8, 200, 24, 100, neg=neg, scale=2.0)
    w = torch.rand(2, 8, generator=torch.Generator().manual_seed(4))
    runs = []
    g = torch.Generator().manual_seed(5)
    for extra in (0, 300, 5000):
        pad = lambda t: None if t is None else torch.cat((t, torch.randn(extra, t.shape[1], generator=g)))  # noqa: E731
        runs.append(_loss_and_grads(iic_softmax_loss, l, ab, (pad(bl), pad(bab), pad(bneg)), idx, 1 / 0.07, w))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_matches_dense_and_module_losses():
    l, ab, bl, bab, bneg, idx = _inputs(*ROWS_SHAPES[0])
    a = iic_softmax_loss(l, ab, bl, bab, bneg, idx, 5.0)
    b = reference.iic_softmax_loss_dense(l, ab, bl, bab, bneg, idx, 5.0)
    out_l, out_ab = reference.iic_scores(l, ab, bl, bab, bneg, idx, 5.0)
    zero = torch.zeros(len(l), dtype=torch.long)
    for x, y, o in zip(a, b, (out_l, out_ab)):
        assert_close(x, y)
        assert_close(x.mean(), F.cross_entropy(o, zero))
        assert_close(torch.exp(-x), o.softmax(1)[:, 0])


@pytest.mark.parametrize("shape", [ROWS_SHAPES[1], ROWS_SHAPES[3], GATHER_SHAPES[0], GATHER_SHAPES[1]])
@pytest.mark.parametrize("neg", [True, False])
def test_gradcheck(shape, neg):
    B, K1, D, N = shape
    l, ab, bl, bab, bneg, idx = _inputs(B, K1, min(D, 6), N, torch.float64, torch.float64, neg)
    l.requires_grad_()
    ab.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: iic_softmax_loss(x, y, bl, bab, bneg, idx, 3.0), (l, ab))


def test_one_view_needs_grad():
    l, ab, bl, bab, bneg, idx = _inputs(*ROWS_SHAPES[1])
    x = l.clone().requires_grad_()
    loss_l, loss_ab = iic_softmax_loss(x, ab, bl, bab, bneg, idx, 2.0)
    (gx,) = torch.autograd.grad(loss_l.sum() + loss_ab.sum(), (x,))
    want = _loss_and_grads(reference.iic_softmax_loss, l, ab, (bl, bab, bneg), idx, 2.0, torch.ones(2, len(l)))
    assert_close(gx, want[2])


def test_deterministic_across_thread_counts():
    # every plan: grouped, GEMM (ROWS_SHAPES[3], and several chunks of bank rows in the last shape) and gathering
    for shape in (ROWS_SHAPES[0], ROWS_SHAPES[3], (4, 8000, 24, 3500), GATHER_SHAPES[1]):
        l, ab, bl, bab, bneg, idx = _inputs(*shape)
        ones = torch.ones(2, shape[0])
        runs = at_thread_counts(
            lambda: _loss_and_grads(iic_softmax_loss, l, ab, (bl, bab, bneg), idx, 5.0, ones), (1, 2, 3, 1))
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_many_pairs_grouped_in_parallel():
    # 2^18 pairs grouped by row, then split into many work units of rows (the most the plan uses)
    l, ab, bl, bab, bneg, idx = _inputs(64, 4096, 8, 87381, torch.float64, torch.float64)
    w = torch.rand(2, 64, dtype=torch.float64)
    want = _loss_and_grads(reference.iic_softmax_loss, l, ab, (bl, bab, bneg), idx, 3.0, w)
    runs = at_thread_counts(lambda: _loss_and_grads(iic_softmax_loss, l, ab, (bl, bab, bneg), idx, 3.0, w), (1, 2, 3))
    for a, b in zip(runs[0], want):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_repeated_draws_count_each_time():
    # a row drawn twice by a sample is two columns of the softmax, as in the reference
    l, ab, bl, bab, bneg, idx = _inputs(2, 6, 8, 5)
    idx = torch.tensor([[1, 3, 3, 3, 0, 1], [4, 4, 4, 4, 4, 4]])
    got = iic_softmax_loss(l, ab, bl, bab, bneg, idx, 4.0)
    want = reference.iic_softmax_loss(l, ab, bl, bab, bneg, idx, 4.0)
    for a, b in zip(got, want):
        assert_close(a, b)
    # every column the same row: the loss is log of the column count, 2 (K+1) = 12 with bank_neg = bank_ab
    same = iic_softmax_loss(l[1:], ab[1:], bl, bab, bab, idx[1:], 4.0)[0]
    assert_close(same, torch.log(torch.tensor([12.0])))


def test_empty_and_strided():
    l, ab, bl, bab, bneg, idx = _inputs(0, 5, 8, 10)
    loss_l, loss_ab = iic_softmax_loss(l, ab, bl, bab, bneg, idx, 2.0)
    assert loss_l.shape == loss_ab.shape == (0,)
    l, ab, bl, bab, bneg, idx = _inputs(5, 9, 12, 30)
    lt, abt = l.t().contiguous().t(), torch.stack([ab, ab], -1).flatten(1)[:, ::2]
    blt = torch.stack([bl, bl], -1).flatten(1)[:, ::2]
    idxt = idx.t().contiguous().t()
    got = iic_softmax_loss(lt, abt, blt, bab, bneg, idxt, 2.0)
    want = reference.iic_softmax_loss(l, ab, bl, bab, bneg, idx, 2.0)
    for a, b in zip(got, want):
        assert_close(a, b)
    # D = 0: every logit is 0, the loss is log(columns)
    l, ab, bl, bab, bneg, idx = _inputs(3, 4, 0, 10)
    assert_close(iic_softmax_loss(l, ab, bl, bab, bneg, idx, 2.0)[0], torch.full((3,), 8.0).log())


def _bad_cases():
    ops = torch.ops.iic_ext
    f, bank, neg = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10, 8)
    idx = torch.randint(0, 10, (4, 3))
    yield "no positive column", lambda: ops.iic_softmax_loss(f, f, bank, bank, neg, idx[:, :0], 1.0), "idx"
    yield "idx out of range", lambda: ops.iic_softmax_loss(f, f, bank, bank, neg, idx + 10, 1.0), "idx"
    yield "idx negative", lambda: ops.iic_softmax_loss(f, f, bank, bank, neg, idx - 10, 1.0), "idx"
    yield "idx dtype", lambda: ops.iic_softmax_loss(f, f, bank, bank, neg, idx.int(), 1.0), "idx"
    yield "idx rows", lambda: ops.iic_softmax_loss(f, f, bank, bank, neg, idx[:3], 1.0), "idx"
    yield "l/ab shape", lambda: ops.iic_softmax_loss(f, f[:3], bank, bank, neg, idx, 1.0), "ab"
    yield "l dtype", lambda: ops.iic_softmax_loss(f.int(), f.int(), bank, bank, neg, idx, 1.0), "l"
    yield "bank_l D", lambda: ops.iic_softmax_loss(f, f, bank[:, :7], bank, neg, idx, 1.0), "bank_l"
    yield "bank_ab N", lambda: ops.iic_softmax_loss(f, f, bank, bank[:9], neg, idx, 1.0), "bank_ab"
    yield "bank_neg dtype", lambda: ops.iic_softmax_loss(f, f, bank, bank, neg.half(), idx, 1.0), "bank_neg"
    yield "device", lambda: ops.iic_softmax_loss(f, f, bank.to("meta"), bank, neg, idx, 1.0), "device"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_inputs_raise(case):
    _, fn, name = case
    with pytest.raises(RuntimeError, match=name):
        fn()


def _opcheck_cases():
    for shape in (ROWS_SHAPES[1], ROWS_SHAPES[3], GATHER_SHAPES[0], GATHER_SHAPES[2]):  # [3]: the GEMM plan
        for neg in (True, False):
            l, ab, bl, bab, bneg, idx = _inputs(*shape, neg=neg)
            yield (l.requires_grad_(), ab.requires_grad_(), bl, bab, bneg, idx, 2.0)


@pytest.mark.parametrize("i", range(len(list(_opcheck_cases()))))
def test_opcheck(i):
    args = list(_opcheck_cases())[i]
    torch.library.opcheck(torch.ops.iic_ext.iic_softmax_loss.default, args)


@pytest.mark.slow
def test_compile():
    l, ab, bl, bab, bneg, idx = _inputs(*ROWS_SHAPES[0])

    def loss(l, ab):
        a, b = iic_softmax_loss(l, ab, bl, bab, bneg, idx, 1 / 0.07)
        return a.mean() + b.mean()

    fn = torch.compile(loss, fullgraph=True)
    x = [l.clone().requires_grad_(), ab.clone().requires_grad_()]
    y = [l.clone().requires_grad_(), ab.clone().requires_grad_()]
    fn(*x).backward()
    loss(*y).backward()
    assert_close(x[0].grad, y[0].grad)
    assert_close(x[1].grad, y[1].grad)


# ---- the unfused form (the CUDA kernel of iic_softmax_loss), checked here on the CPU ---------------


@pytest.mark.parametrize("fdt,bdt", DTYPES)
@pytest.mark.parametrize("shape", [ROWS_SHAPES[0], ROWS_SHAPES[2], GATHER_SHAPES[1], GATHER_SHAPES[2]])
@pytest.mark.parametrize("neg", [True, False])
def test_unfused_equals_one_pass_kernel(fdt, bdt, shape, neg):
    """Losses and per-sample gradients of the scores + log_softmax + scores-backward form equal the
    one-pass kernel's (both checked against float64 cross-entropy above and here)."""
    l, ab, bl, bab, bneg, idx = _inputs(*shape, fdt, bdt, neg, scale=3.0)
    inv_t = 1 / 0.07
    got = torch.ops.iic_ext._iic_softmax_loss_unfused(l, ab, bl, bab, bneg, idx, inv_t)
    want = torch.ops.iic_ext.iic_softmax_loss(l, ab, bl, bab, bneg, idx, inv_t)
    acc = torch.float64 if torch.float64 in (fdt, bdt) else torch.float32
    tol = 1e-9 if acc == torch.float64 else 2e-4
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == acc and a.shape == b.shape and a.is_contiguous()
        assert_close(a, b, rtol=tol, atol=tol * inv_t)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    w = torch.ones(2, shape[0], dtype=torch.float64)
    ref = _loss_and_grads(reference.iic_softmax_loss, d(l), d(ab), (d(bl), d(bab), d(bneg)), idx, inv_t, w)
    for a, b in zip(got, ref):
        assert_close(a.double(), b, rtol=tol * 10, atol=tol * 10 * inv_t)


def test_unfused_bad_inputs_and_opcheck():
    f, bank = torch.randn(4, 8), torch.randn(10, 8)
    idx = torch.randint(0, 10, (4, 3))
    with pytest.raises(RuntimeError, match="idx has an entry out of range"):
        torch.ops.iic_ext._iic_softmax_loss_unfused(f, f, bank, bank, bank, idx + 10, 1.0)
    with pytest.raises(RuntimeError, match="idx must have at least one column"):
        torch.ops.iic_ext._iic_softmax_loss_unfused(f, f, bank, bank, bank, idx[:, :0], 1.0)
    args = _inputs(*ROWS_SHAPES[1])
    torch.library.opcheck(torch.ops.iic_ext._iic_softmax_loss_unfused.default, (*args, 2.0))
