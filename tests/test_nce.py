"""NCE memory-bank ops against their pure-PyTorch twins (iic_ext.ops.reference)."""
import pytest
import torch
from torch.testing import assert_close

from conftest import NCE_DTYPES, at_thread_counts
from iic_ext.ops import HAS_C, bank_scores, bank_update_, iic_scores, reference

pytestmark = pytest.mark.skipif(not HAS_C, reason="compiled iic_ext._C not built")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])]
DTYPES = NCE_DTYPES
# (B, K, D, N). The op's plan depends on the draws per bank row, B*K / N: above 4 (8 for iic_scores) a
# GEMM against the whole bank (float32/float64 banks), above 1 the pairs grouped by row, else the rows
# gathered. (3, 7, 1, 5) is a GEMM for bank_scores and grouped by row for iic_scores.
DENSE_SHAPES = [(4, 50, 37, 20), (3, 7, 1, 5), (2, 600, 20, 100)]
ROWS_SHAPES = [(16, 64, 128, 300), (8, 30, 19, 100), (3, 3, 1, 5)]
GATHER_SHAPES = [(4, 5, 37, 1000), (2, 300, 33, 10000), (1, 1, 16, 10), (5, 3, 130, 64)]
SHAPES = DENSE_SHAPES + ROWS_SHAPES + GATHER_SHAPES


def _unit_rows(n, d, dtype, device, gen):
    bank = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    return torch.nn.functional.normalize(bank, dim=1).to(dtype)


def _inputs(B, K, D, N, fdt, bdt, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(B, D, generator=g, dtype=torch.float64).to(device=device, dtype=fdt)
    bank = _unit_rows(N, D, bdt, device, g)
    idx = torch.randint(0, N, (B, K), generator=g).to(device)
    return feat, bank, idx


def _assert_low_precision(out, exact, native, dtype):
    """Flash-attention's rule: the op's error against float64 is at most ~2x the reference's own."""
    if dtype in (torch.float32, torch.float64):
        tol = {torch.float32: 2e-5, torch.float64: 1e-10}[dtype]
        assert_close(out.double(), exact, rtol=tol, atol=tol)
        return
    err = (out.double() - exact).abs().max().item()
    ref_err = (native.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def _padded(bank, extra):
    """The same bank followed by many unused rows: moves the op from row grouping to gathering."""
    return torch.cat([bank, torch.zeros(extra, bank.shape[1], dtype=bank.dtype, device=bank.device)])


# ---- bank_scores -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fdt,bdt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bank_scores_matches_reference(device, fdt, bdt, shape):
    feat, bank, idx = _inputs(*shape, fdt, bdt, device)
    out = bank_scores(feat, bank, idx)
    assert out.shape == idx.shape and out.dtype == fdt
    exact = reference.bank_scores(feat.double(), bank.double(), idx)
    _assert_low_precision(out, exact, reference.bank_scores(feat, bank, idx), fdt)
    assert_close(reference.bank_scores_dense(feat.double(), bank.double(), idx), exact)


@pytest.mark.parametrize("shape", DENSE_SHAPES + ROWS_SHAPES[:2])
def test_bank_scores_plans_agree(shape):
    """The same bank padded with unused rows moves the op from GEMM to row grouping to gathering:
    the scores and gradients agree."""
    B, K, D, N = shape
    feat, bank, idx = _inputs(B, K, D, N, torch.float32, torch.float32)
    banks = [bank, _padded(bank, max(0, B * K // 2 - N)), _padded(bank, B * K + 10)]
    outs = [bank_scores(feat, b, idx) for b in banks]
    g = torch.randn(B, K)
    grads = []
    for b in banks:
        f = feat.clone().requires_grad_()
        grads.append(torch.autograd.grad(bank_scores(f, b, idx), f, g)[0])
    for o, gr in zip(outs[1:], grads[1:]):
        assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
        assert_close(gr, grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fdt,bdt", DTYPES)
@pytest.mark.parametrize("shape", [DENSE_SHAPES[0], DENSE_SHAPES[2], ROWS_SHAPES[0], ROWS_SHAPES[1], GATHER_SHAPES[0], GATHER_SHAPES[1]])
def test_bank_scores_backward_matches_reference(fdt, bdt, shape):
    feat, bank, idx = _inputs(*shape, fdt, bdt)
    grad = torch.randn(idx.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(fdt)
    f = feat.clone().requires_grad_()
    (g_op,) = torch.autograd.grad(bank_scores(f, bank, idx), f, grad)
    assert g_op.dtype == fdt
    f64 = feat.double().requires_grad_()
    (exact,) = torch.autograd.grad(reference.bank_scores(f64, bank.double(), idx), f64, grad.double())
    fn = feat.clone().requires_grad_()
    (native,) = torch.autograd.grad(reference.bank_scores(fn, bank, idx), fn, grad)
    _assert_low_precision(g_op, exact, native, fdt)


def test_bank_scores_strided_inputs():
    B, K, D, N = 6, 40, 33, 50
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(D, B, generator=g).t()  # column-major
    wide = torch.randn(N, D + 5, generator=g)
    bank_rows = wide[:, 2 : 2 + D]  # row stride D + 5
    bank_cols = torch.randn(N, 2 * D, generator=g)[:, ::2]  # column stride 2
    idx = torch.randint(0, N, (K, B), generator=g).t()
    for bank in (bank_rows, bank_cols):
        assert_close(bank_scores(feat, bank, idx), reference.bank_scores(feat, bank, idx), rtol=1e-5, atol=1e-5)
        assert_close(
            bank_scores(feat, _padded(bank, 5000), idx), reference.bank_scores(feat, bank, idx), rtol=1e-5, atol=1e-5
        )


def test_bank_scores_empty():
    bank = torch.randn(10, 8)
    out = bank_scores(torch.randn(0, 8), bank, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 4)
    out = bank_scores(torch.randn(3, 8), bank, torch.zeros(3, 0, dtype=torch.long))
    assert out.shape == (3, 0)
    f = torch.randn(0, 8, requires_grad=True)
    bank_scores(f, bank, torch.zeros(0, 4, dtype=torch.long)).sum().backward()
    assert f.grad.shape == (0, 8)
    f = torch.randn(3, 8, requires_grad=True)
    bank_scores(f, bank, torch.zeros(3, 0, dtype=torch.long)).sum().backward()
    assert torch.equal(f.grad, torch.zeros(3, 8))


@pytest.mark.parametrize("B,K", [(0, 4), (3, 0), (0, 0)])
def test_references_empty(B, K):
    """The reference twins give empty results of the right shapes, as the kernels do."""
    bank = torch.randn(10, 8)
    feat, idx = torch.randn(B, 8), torch.zeros(B, K, dtype=torch.long)
    for fn in (reference.bank_scores, reference.bank_scores_dense):
        assert fn(feat, bank, idx).shape == (B, K)
    for neg, C in ((bank, 2 * K), (None, K)):
        for fn in (reference.iic_scores, reference.iic_scores_dense):
            out_l, out_ab = fn(feat, feat, bank, bank, neg, idx, 2.0)
            assert out_l.shape == out_ab.shape == (B, C)


@pytest.mark.parametrize("shape", [DENSE_SHAPES[0], ROWS_SHAPES[1], GATHER_SHAPES[0]])
def test_bank_scores_gradcheck(shape):
    B, K, D, N = shape
    feat, bank, idx = _inputs(B, K, min(D, 9), N, torch.float64, torch.float64)
    feat.requires_grad_()
    assert torch.autograd.gradcheck(lambda f: bank_scores(f, bank, idx), (feat,), fast_mode=True)


# the GEMM plan with several chunks of bank rows (nce.cpp: dense_chunks)
DENSE_CHUNKED_SHAPE = (4, 8000, 24, 3500)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_gemm_plan_without_autograd_on_every_thread(mode):
    # the GEMM plan's products run on the pool's threads, which do not carry the caller's mode: under
    # inference mode its outputs are inference tensors, written there all the same
    from iic_ext.ops import iic_softmax_loss

    l, ab, bl, bab, bneg, idx = _iic_inputs(*DENSE_CHUNKED_SHAPE, torch.float32, torch.float32)
    want_s = reference.bank_scores(l, bl, idx)
    want_i = reference.iic_scores(l, ab, bl, bab, bneg, idx, 2.0)
    want_loss = reference.iic_softmax_loss(l, ab, bl, bab, bneg, idx, 2.0)

    def run():
        with mode():
            return bank_scores(l, bl, idx), iic_scores(l, ab, bl, bab, bneg, idx, 2.0), iic_softmax_loss(
                l, ab, bl, bab, bneg, idx, 2.0)

    for s, i, loss in at_thread_counts(run, (1, 2, 3)):
        assert_close(s, want_s, rtol=1e-5, atol=1e-5)
        for got, want in zip((*i, *loss), (*want_i, *want_loss)):
            assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bank_scores_deterministic():
    # across thread counts, every plan: the GEMM plan's BLAS calls work on fixed chunks of bank rows
    for shape in (ROWS_SHAPES[0], GATHER_SHAPES[1], DENSE_SHAPES[2], DENSE_CHUNKED_SHAPE):
        feat, bank, idx = _inputs(*shape, torch.float32, torch.float32)
        grad = torch.randn(idx.shape)

        def run():
            f = feat.clone().requires_grad_()
            out = bank_scores(f, bank, idx)
            out.backward(grad)
            return out, f.grad

        runs = at_thread_counts(run, (1, 2, 3, 1))
        for out, g in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(g, runs[0][1])


# ---- iic_scores ----------------------------------------------------------------------------------------


def _iic_inputs(B, K1, D, N, fdt, bdt, neg=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    l = torch.randn(B, D, generator=g, dtype=torch.float64).to(device=device, dtype=fdt)
    ab = torch.randn(B, D, generator=g, dtype=torch.float64).to(device=device, dtype=fdt)
    banks = [_unit_rows(N, D, bdt, device, g) for _ in range(3)]
    idx = torch.randint(0, N, (B, K1), generator=g).to(device)
    return l, ab, banks[0], banks[1], banks[2] if neg else None, idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fdt,bdt", DTYPES)
@pytest.mark.parametrize("shape", [DENSE_SHAPES[0], ROWS_SHAPES[1], ROWS_SHAPES[2], GATHER_SHAPES[0], GATHER_SHAPES[2]])
@pytest.mark.parametrize("neg", [True, False])
def test_iic_scores_matches_reference(device, fdt, bdt, shape, neg):
    l, ab, bl, bab, bneg, idx = _iic_inputs(*shape, fdt, bdt, neg, device)
    inv_t = 1 / 0.07
    out_l, out_ab = iic_scores(l, ab, bl, bab, bneg, idx, inv_t)
    cols = idx.shape[1] * (2 if neg else 1)
    assert out_l.shape == out_ab.shape == (idx.shape[0], cols) and out_l.dtype == fdt
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ex_l, ex_ab = reference.iic_scores(l.double(), ab.double(), bl.double(), bab.double(), d(bneg), idx, inv_t)
    na_l, na_ab = reference.iic_scores(l, ab, bl, bab, bneg, idx, inv_t)
    _assert_low_precision(out_l / inv_t, ex_l / inv_t, na_l / inv_t, fdt)
    _assert_low_precision(out_ab / inv_t, ex_ab / inv_t, na_ab / inv_t, fdt)
    de_l, de_ab = reference.iic_scores_dense(l.double(), ab.double(), bl.double(), bab.double(), d(bneg), idx, inv_t)
    assert_close(de_l, ex_l)
    assert_close(de_ab, ex_ab)


@pytest.mark.parametrize("fdt,bdt", DTYPES)
@pytest.mark.parametrize("shape", [DENSE_SHAPES[0], DENSE_SHAPES[2], ROWS_SHAPES[1], GATHER_SHAPES[1], GATHER_SHAPES[3]])
@pytest.mark.parametrize("neg", [True, False])
def test_iic_scores_backward_matches_reference(fdt, bdt, shape, neg):
    l, ab, bl, bab, bneg, idx = _iic_inputs(*shape, fdt, bdt, neg)
    inv_t = 1 / 0.07
    C = idx.shape[1] * (2 if neg else 1)
    # the incoming gradients in the feature dtype, so that the exact result is the one for the op's inputs
    g = torch.Generator().manual_seed(1)
    gl, gab = torch.randn(2, idx.shape[0], C, dtype=torch.float64, generator=g).to(fdt)

    def grads(fn, l, ab, banks, gl, gab):
        l, ab = l.clone().requires_grad_(), ab.clone().requires_grad_()
        o_l, o_ab = fn(l, ab, *banks, idx, inv_t)
        return torch.autograd.grad((o_l, o_ab), (l, ab), (gl, gab))

    op = grads(iic_scores, l, ab, (bl, bab, bneg), gl, gab)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact = grads(reference.iic_scores, l.double(), ab.double(), (d(bl), d(bab), d(bneg)), gl.double(), gab.double())
    native = grads(reference.iic_scores, l, ab, (bl, bab, bneg), gl, gab)
    for o, e, n in zip(op, exact, native):
        assert o.dtype == fdt
        _assert_low_precision(o * 0.07, e * 0.07, n * 0.07, fdt)


@pytest.mark.parametrize("neg", [True, False])
def test_iic_scores_plans_agree(neg):
    l, ab, bl, bab, bneg, idx = _iic_inputs(8, 65, 40, 100, torch.float32, torch.float32, neg)  # GEMM
    gl, gab = torch.randn(2, 8, 65 * (2 if neg else 1))
    results = []
    for extra in (0, 200, 1000):  # GEMM, row grouping, gathering
        pad = lambda t: None if t is None else _padded(t, extra)  # noqa: E731
        x, y = l.clone().requires_grad_(), ab.clone().requires_grad_()
        outs = iic_scores(x, y, pad(bl), pad(bab), pad(bneg), idx, 2.0)
        results.append(outs + torch.autograd.grad(outs, (x, y), (gl, gab)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, rtol=1e-5, atol=1e-5)


# The GEMM plan keeps a job's scores in bank-row order ([N, jobs' features]) while they take at most 1 MiB,
# else in feature order. (B, K, D, N) with more than 8 draws per bank row: both jobs of one feature
# and the negative bank's job of two in bank-row order; the one-feature jobs in bank-row order and the
# negative bank's (2 B features: 1.5 MiB in float32) in feature order; every job in feature order.
@pytest.mark.parametrize("shape", [(16, 300, 8, 500), (32, 1600, 8, 6000), (64, 600, 8, 4200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_plan_in_either_score_order_matches_reference(shape, dtype):
    l, ab, bl, bab, bneg, idx = _iic_inputs(*shape, dtype, dtype)
    g = torch.Generator().manual_seed(2)
    gl, gab = torch.randn(2, shape[0], 2 * shape[1], dtype=torch.float64, generator=g).to(dtype)
    d = lambda t: t.double().requires_grad_()  # noqa: E731
    x, y = l.clone().requires_grad_(), ab.clone().requires_grad_()
    got = iic_scores(x, y, bl, bab, bneg, idx, 3.0)
    got += torch.autograd.grad(got, (x, y), (gl, gab))
    x, y = d(l), d(ab)
    want = reference.iic_scores(x, y, bl.double(), bab.double(), bneg.double(), idx, 3.0)
    want += torch.autograd.grad(want, (x, y), (gl.double(), gab.double()))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(got, want):
        assert_close(a.double(), b, rtol=tol, atol=tol)
    # bank_scores: one job of B features
    x = l.clone().requires_grad_()
    s = bank_scores(x, bab, idx)
    (gs,) = torch.autograd.grad(s, x, gl[:, : shape[1]])
    x = d(l)
    ws = reference.bank_scores(x, bab.double(), idx)
    (wg,) = torch.autograd.grad(ws, x, gl[:, : shape[1]].double())
    assert_close(s.double(), ws, rtol=tol, atol=tol)
    assert_close(gs.double(), wg, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [DENSE_SHAPES[0], ROWS_SHAPES[1], GATHER_SHAPES[0]])
@pytest.mark.parametrize("neg", [True, False])
def test_iic_scores_gradcheck(shape, neg):
    B, K, D, N = shape
    l, ab, bl, bab, bneg, idx = _iic_inputs(B, K, min(D, 7), N, torch.float64, torch.float64, neg)
    l.requires_grad_()
    ab.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: iic_scores(x, y, bl, bab, bneg, idx, 3.0), (l, ab), fast_mode=True)


def test_iic_scores_empty_and_strided():
    l, ab, bl, bab, bneg, idx = _iic_inputs(0, 5, 8, 10, torch.float32, torch.float32)
    out_l, out_ab = iic_scores(l, ab, bl, bab, bneg, idx, 2.0)
    assert out_l.shape == out_ab.shape == (0, 10)
    l, ab, bl, bab, bneg, idx = _iic_inputs(5, 9, 12, 30, torch.float32, torch.float32)
    lt, abt = l.t().contiguous().t(), torch.stack([ab, ab], -1).flatten(1)[:, ::2]
    for a, b in zip(iic_scores(lt, abt, bl, bab, bneg, idx, 2.0), reference.iic_scores(l, ab, bl, bab, bneg, idx, 2.0)):
        assert_close(a, b)


def test_iic_scores_deterministic():
    for shape in (DENSE_SHAPES[2], DENSE_CHUNKED_SHAPE, ROWS_SHAPES[0], GATHER_SHAPES[1]):
        l, ab, bl, bab, bneg, idx = _iic_inputs(*shape, torch.float32, torch.float32)

        def run():
            x, y = l.clone().requires_grad_(), ab.clone().requires_grad_()
            o = iic_scores(x, y, bl, bab, bneg, idx, 5.0)
            (o[0].sin().sum() + o[1].cos().sum()).backward()
            return o[0], o[1], x.grad, y.grad

        runs = at_thread_counts(run, (1, 2, 3, 1))
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def holds_grouping():
    return torch.ops.iic_ext._nce_holds_grouping()


# The CPU forward keeps its row grouping for the backward of the same idx tensor (one autograd step),
# when a backward can follow (grad mode on, a feature requiring grad).
# (8, 30, 19, 100): 2.4 draws per bank row, grouped by row for both ops.
def _grouped_backward(op, seed):
    B, K, D, N = 8, 30, 19, 100
    if op == "bank":
        feat, bank, _ = _inputs(B, K, D, N, torch.float64, torch.float64, seed=seed)
        grad = torch.randn(B, K, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        fwd = lambda x, ix: (bank_scores(x, bank, ix),)
        bwd = lambda ix: (torch.ops.iic_ext._bank_scores_backward(grad, bank, ix, torch.float64),)
        ref = lambda x, ix: torch.autograd.grad(reference.bank_scores(x, bank, ix), x, grad)
        return [feat], [grad], fwd, bwd, ref
    l, ab, bl, bab, bneg, _ = _iic_inputs(B, K, D, N, torch.float64, torch.float64, seed=seed)
    gl, gab = torch.randn(2, B, 2 * K, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fwd = lambda x, y, ix: iic_scores(x, y, bl, bab, bneg, ix, 2.0)
    bwd = lambda ix: torch.ops.iic_ext._iic_scores_backward(gl, gab, bl, bab, bneg, ix, 2.0, torch.float64)
    ref = lambda x, y, ix: torch.autograd.grad(reference.iic_scores(x, y, bl, bab, bneg, ix, 2.0), (x, y), (gl, gab))
    return [l, ab], [gl, gab], fwd, bwd, ref


@pytest.mark.parametrize("op", ["bank", "iic"])
def test_backward_reuses_forward_grouping_only_for_unchanged_draws(op):
    idx = torch.randint(0, 100, (8, 30), generator=torch.Generator().manual_seed(0))
    feats, ups, fwd, bwd, ref = _grouped_backward(op, seed=0)
    # one autograd step (the backward gets the forward's idx) against a backward that groups afresh
    xs = [f.clone().requires_grad_() for f in feats]
    outs = fwd(*xs, idx)
    got = torch.autograd.grad(outs, xs, ups)
    assert_close(got, ref(*[f.clone().requires_grad_() for f in feats], idx))
    assert not holds_grouping()  # the backward took it
    fwd(*[f.clone().requires_grad_() for f in feats], idx)
    assert holds_grouping()
    cached = bwd(idx)
    assert not holds_grouping()
    fresh = bwd(idx.clone())
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
    # idx changed in place after the forward: its grouping must not be reused
    fwd(*[f.clone().requires_grad_() for f in feats], idx)
    new = torch.randint(0, 100, (8, 30), generator=torch.Generator().manual_seed(1))
    idx.copy_(new)
    assert_close(bwd(idx), ref(*[f.clone().requires_grad_() for f in feats], new))


@pytest.mark.parametrize("op", ["bank", "iic"])
def test_forward_keeps_grouping_only_when_a_backward_can_follow(op):
    idx = torch.randint(0, 100, (8, 30), generator=torch.Generator().manual_seed(0))
    feats, _, fwd, _, _ = _grouped_backward(op, seed=0)
    xs = [f.clone().requires_grad_() for f in feats]

    def backward(outs):
        torch.autograd.grad(outs, xs, [torch.ones_like(o) for o in outs])

    outs = fwd(*xs, idx)  # one training step: the forward keeps its grouping, the backward takes it
    assert holds_grouping()
    backward(outs)
    assert not holds_grouping()
    fwd(*feats, idx)  # no feature requires grad
    assert not holds_grouping()
    with torch.no_grad():
        fwd(*xs, idx)
    assert not holds_grouping()
    with torch.inference_mode():
        fwd(*xs, idx)
    assert not holds_grouping()
    outs = fwd(*xs, idx)
    assert holds_grouping()
    backward(outs)
    assert not holds_grouping()


# 2^18 pairs, grouped by row, then split into many work units of rows (the most the plans use); 3 draws
# per bank row keeps both ops on the grouped plan
MANY_PAIRS = (64, 4096, 8, 87381)


def test_many_pairs_grouped_in_parallel_match_reference_at_every_thread_count():
    B, K, D, N = MANY_PAIRS
    feat, bank, idx = _inputs(B, K, D, N, torch.float64, torch.float64)
    l, ab, bl, bab, bneg, _ = _iic_inputs(B, K, D, N, torch.float64, torch.float64)
    grad = torch.randn(B, K, dtype=torch.float64)
    gl, gab = torch.randn(2, B, 2 * K, dtype=torch.float64)
    x = feat.clone().requires_grad_()
    want_s = reference.bank_scores(x, bank, idx)
    (want_sf,) = torch.autograd.grad(want_s, x, grad)
    x, y = l.clone().requires_grad_(), ab.clone().requires_grad_()
    want_i = reference.iic_scores(x, y, bl, bab, bneg, idx, 3.0)
    want_ig = torch.autograd.grad(want_i, (x, y), (gl, gab))

    def run():
        x = feat.clone().requires_grad_()
        s = bank_scores(x, bank, idx)
        (sf,) = torch.autograd.grad(s, x, grad)
        x, y = l.clone().requires_grad_(), ab.clone().requires_grad_()
        o = iic_scores(x, y, bl, bab, bneg, idx, 3.0)
        return (s, sf, *o, *torch.autograd.grad(o, (x, y), (gl, gab)))

    runs = at_thread_counts(run, (1, 2, 3))
    for got, want in zip(runs[0], (want_s, want_sf, *want_i, *want_ig)):
        assert_close(got, want, rtol=1e-10, atol=1e-10)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# ---- bank_update_ --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fdt,bdt", DTYPES)
def test_bank_update_matches_reference(device, fdt, bdt):
    g = torch.Generator().manual_seed(1)
    N, D, B = 40, 37, 12
    bank = _unit_rows(N, D, bdt, device, g)
    feat = torch.randn(B, D, generator=g).to(device=device, dtype=fdt)
    idx = torch.randperm(N, generator=g)[:B].to(device)
    ours, ref = bank.clone(), bank.clone()
    assert bank_update_(ours, idx, feat, 0.5) is ours
    reference.bank_update_(ref, idx, feat, 0.5)
    exact = reference.bank_update_(bank.double(), idx, feat.double(), 0.5)
    low = bdt in (torch.float16, torch.bfloat16)
    assert_close(ours.double(), exact, rtol=0, atol=1e-2 if low else 1e-6)
    assert_close(ours, ref, rtol=0, atol=1e-2 if low else 1e-6)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx.cpu()] = False
    assert torch.equal(ours[untouched.to(device)], bank[untouched.to(device)])


def test_bank_update_duplicates_last_wins():
    g = torch.Generator().manual_seed(2)
    N, D = 10, 16
    bank = _unit_rows(N, D, torch.float32, "cpu", g)
    feat = torch.randn(6, D, generator=g)
    idx = torch.tensor([3, 5, 3, 7, 3, 5])
    results = []
    for _ in range(3):
        b = bank.clone()
        bank_update_(b, idx, feat, 0.3)
        results.append(b)
    assert all(torch.equal(r, results[0]) for r in results)
    ref = reference.bank_update_(bank.clone(), idx, feat, 0.3)  # index_copy_: the last occurrence
    assert_close(results[0], ref)
    expect = torch.nn.functional.normalize(0.3 * bank[3] + 0.7 * feat[4], dim=0)
    assert_close(results[0][3], expect)
    expect = torch.nn.functional.normalize(0.3 * bank[5] + 0.7 * feat[5], dim=0)
    assert_close(results[0][5], expect)


def test_bank_update_strided_and_empty():
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(20, 30, generator=g)
    bank = wide[:, ::3]  # column stride 3: updated through its strides
    feat = torch.randn(4, 10, generator=g)
    idx = torch.tensor([1, 0, 19, 4])
    ref = reference.bank_update_(bank.clone(), idx, feat, 0.5)
    bank_update_(bank, idx, feat, 0.5)
    assert_close(bank, ref)
    assert_close(wide[:, ::3], ref)
    before = bank.clone()
    bank_update_(bank, torch.zeros(0, dtype=torch.long), torch.randn(0, 10), 0.5)
    assert torch.equal(bank, before)


def test_bank_update_ignores_feature_grad():
    bank = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    feat = torch.randn(2, 4, requires_grad=True)
    bank_update_(bank, torch.tensor([1, 2]), feat, 0.5)
    assert not bank.requires_grad and feat.grad is None


# ---- bad inputs ----------------------------------------------------------------------------------------


def _bad_cases():
    f, bank, idx = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4, 3))
    ops = torch.ops.iic_ext
    neg = torch.randn(10, 8)
    yield "idx has a negative", lambda: ops.bank_scores(f, bank, torch.full((4, 3), -1)), "idx"
    yield "idx out of range", lambda: ops.bank_scores(f, bank, torch.full((4, 3), 10)), "idx"
    yield "idx dtype", lambda: ops.bank_scores(f, bank, idx.int()), "idx"
    yield "idx ndim", lambda: ops.bank_scores(f, bank, idx[0]), "idx"
    yield "idx rows", lambda: ops.bank_scores(f, bank, idx[:3]), "idx"
    yield "feat ndim", lambda: ops.bank_scores(f[None], bank, idx), "feat"
    yield "feat dtype", lambda: ops.bank_scores(f.int(), bank, idx), "feat"
    yield "bank ndim", lambda: ops.bank_scores(f, bank[None], idx), "bank"
    yield "bank dtype", lambda: ops.bank_scores(f, bank.long(), idx), "bank"
    yield "D mismatch", lambda: ops.bank_scores(f, bank[:, :7], idx), "bank"
    yield "device", lambda: ops.bank_scores(f, bank.to("meta"), idx), "device"
    g = torch.randn(4, 3)
    yield "bwd grad shape", lambda: ops._bank_scores_backward(g[:, :2], bank, idx, torch.float32), "grad"
    yield "bwd idx range", lambda: ops._bank_scores_backward(g, bank, idx + 10, torch.float32), "idx"
    yield "bwd dtype", lambda: ops._bank_scores_backward(g, bank, idx, torch.int32), "dtype"
    yield "iic l/ab shape", lambda: ops.iic_scores(f, f[:3], bank, bank, neg, idx, 1.0), "ab"
    yield "iic l/ab dtype", lambda: ops.iic_scores(f, f.double(), bank, bank, neg, idx, 1.0), "ab"
    yield "iic bank_l D", lambda: ops.iic_scores(f, f, bank[:, :7], bank, neg, idx, 1.0), "bank_l"
    yield "iic bank_ab N", lambda: ops.iic_scores(f, f, bank, bank[:9], neg, idx, 1.0), "bank_ab"
    yield "iic bank_neg N", lambda: ops.iic_scores(f, f, bank, bank, neg[:9], idx, 1.0), "bank_neg"
    yield "iic bank_neg dtype", lambda: ops.iic_scores(f, f, bank, bank, neg.double(), idx, 1.0), "bank_neg"
    yield "iic idx range", lambda: ops.iic_scores(f, f, bank, bank, neg, idx + 10, 1.0), "idx"
    yield "iic idx rows", lambda: ops.iic_scores(f, f, bank, bank, neg, idx[:2], 1.0), "idx"
    gl = torch.randn(4, 6)
    yield "iic bwd cols", lambda: ops._iic_scores_backward(gl[:, :5], gl[:, :5], bank, bank, neg, idx, 1.0, torch.float32), "grad_l"
    yield "update y length", lambda: ops.bank_update_(bank.clone(), idx[:3, 0], f, 0.5), "idx"
    yield "update y ndim", lambda: ops.bank_update_(bank.clone(), idx, f, 0.5), "idx"
    yield "update y range", lambda: ops.bank_update_(bank.clone(), torch.tensor([0, 1, 2, 10]), f, 0.5), "idx"
    yield "update y negative", lambda: ops.bank_update_(bank.clone(), torch.tensor([0, -1, 2, 3]), f, 0.5), "idx"
    yield "update D", lambda: ops.bank_update_(bank.clone(), idx[:, 0], f[:, :7], 0.5), "feat"
    yield "update dtype", lambda: ops.bank_update_(bank.int(), idx[:, 0], f, 0.5), "bank"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_inputs_raise(case):
    _, fn, name = case
    with pytest.raises(RuntimeError, match=name):
        fn()


# ---- opcheck and torch.compile -------------------------------------------------------------------------


def _opcheck_cases():
    ops = torch.ops.iic_ext
    for shape in (DENSE_SHAPES[0], ROWS_SHAPES[1], GATHER_SHAPES[0]):
        feat, bank, idx = _inputs(*shape, torch.float32, torch.float32)
        yield ops.bank_scores.default, (feat.requires_grad_(), bank, idx)
        yield ops._bank_scores_backward.default, (torch.randn(idx.shape), bank, idx, torch.float32)
        for neg in (True, False):
            l, ab, bl, bab, bneg, idx = _iic_inputs(*shape, torch.float32, torch.float32, neg)
            yield ops.iic_scores.default, (l.requires_grad_(), ab.requires_grad_(), bl, bab, bneg, idx, 2.0)
            C = idx.shape[1] * (2 if neg else 1)
            g = torch.randn(idx.shape[0], C)
            yield ops._iic_scores_backward.default, (g, g.clone(), bl, bab, bneg, idx, 2.0, torch.float32)
        yield ops.bank_update_.default, (bank.clone(), idx[:, 0].clone(), feat.detach().clone(), 0.5)


@pytest.mark.parametrize("i", range(len(list(_opcheck_cases()))))
def test_opcheck(i):
    op, args = list(_opcheck_cases())[i]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_compile_bank_scores():
    feat, bank, idx = _inputs(*ROWS_SHAPES[0], torch.float32, torch.float32)
    fn = torch.compile(lambda f, b, i: bank_scores(f, b, i).square().sum(), fullgraph=True)
    f1, f2 = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    fn(f1, bank, idx).backward()
    bank_scores(f2, bank, idx).square().sum().backward()
    assert_close(f1.grad, f2.grad)


@pytest.mark.slow
def test_compile_iic_scores():
    l, ab, bl, bab, bneg, idx = _iic_inputs(*GATHER_SHAPES[0], torch.float32, torch.float32)

    def loss(l, ab):
        o_l, o_ab = iic_scores(l, ab, bl, bab, bneg, idx, 1 / 0.07)
        return torch.nn.functional.cross_entropy(o_l, torch.zeros(len(o_l), dtype=torch.long)) + o_ab.logsumexp(1).sum()

    fn = torch.compile(loss, fullgraph=True)
    a = [l.clone().requires_grad_(), ab.clone().requires_grad_()]
    b = [l.clone().requires_grad_(), ab.clone().requires_grad_()]
    fn(*a).backward()
    loss(*b).backward()
    assert_close(a[0].grad, b[0].grad)
    assert_close(a[1].grad, b[1].grad)


@pytest.mark.slow
def test_compile_bank_update():
    g = torch.Generator().manual_seed(5)
    bank = _unit_rows(20, 8, torch.float32, "cpu", g)
    feat, idx = torch.randn(4, 8, generator=g), torch.tensor([1, 5, 1, 9])

    def step(bank, idx, feat):
        bank_update_(bank, idx, feat * 2, 0.5)
        return bank.sum()

    b1, b2 = bank.clone(), bank.clone()
    torch.compile(step, fullgraph=True)(b1, idx, feat)
    step(b2, idx, feat)
    assert torch.equal(b1, b2)


def test_denormal_mode_is_restored():
    # the kernels read denormals as zero inside their work units only; the caller's mode is untouched
    from iic_ext.ops import iic_softmax_loss

    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 2).item() > 0  # this process does not flush denormals to begin with
    l, ab, bl, bab, bneg, idx = _iic_inputs(*ROWS_SHAPES[0], torch.float32, torch.float32)
    x, y = l.clone().requires_grad_(), ab.clone().requires_grad_()
    out_l, out_ab = iic_scores(x, y, bl, bab, bneg, idx, 5.0)
    (out_l.sum() + out_ab.sum()).backward()
    iic_softmax_loss(l, ab, bl, bab, bneg, idx, 5.0)
    bank_update_(bl, idx[:, 0], l, 0.5)
    assert (tiny * 2).item() > 0


def test_denormal_gradients_match_reference():
    # softmax gradients far below the smallest normal float: flushed inside the kernel, same result
    l, ab, bl, bab, bneg, idx = _iic_inputs(*ROWS_SHAPES[0], torch.float32, torch.float32)
    grads = torch.full((idx.shape[0], 2 * idx.shape[1]), 1e-40)
    grads[:, 0] = 1.0
    got = torch.ops.iic_ext._iic_scores_backward(grads, grads, bl, bab, bneg, idx, 5.0, torch.float32)
    with torch.enable_grad():
        x, y = l.double().requires_grad_(), ab.double().requires_grad_()
        o = reference.iic_scores(x, y, bl.double(), bab.double(), bneg.double(), idx, 5.0)
        want = torch.autograd.grad(o, (x, y), (grads.double(), grads.double()))
    for a, b in zip(got, want):
        assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
