"""Residual frames, temporal gather, intra-negatives and fused IIC views against the reference."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iic_ext
from iic_ext import ops
from iic_ext.ops import indices, reference

from conftest import CLIP_DTYPES, DEVICES, FLOAT_DTYPES, LAYOUTS, LOW_PRECISION_FACTOR, make_clip, tolerance

SHAPES = [(1, 3, 1, 4, 5), (2, 3, 5, 7, 9), (3, 1, 16, 8, 8), (2, 3, 4, 1, 1)]
VIEW_OPS = [
    "residual_frames",
    "_residual_frames_backward",
    "temporal_gather",
    "_temporal_gather_backward",
    "iic_views",
]


def test_compiled_library_is_loaded():
    assert ops.HAS_C, f"iic_ext._C failed to load: {ops._library.LOAD_ERROR}"
    for name in VIEW_OPS:
        assert hasattr(torch.ops.iic_ext, name), name


def _assert_low_precision(out, ref_low, ref64):
    """An op's error against float64 must be at most ~2x the reference's own error in that dtype."""
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_low.double() - ref64).abs().max().item()
    assert err <= LOW_PRECISION_FACTOR * ref_err + 1e-6, (err, ref_err)


# ---- residual frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CLIP_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaled", [True, False])
def test_residual_frames_matches_reference(device, dtype, layout, shape, scaled):
    x = make_clip(shape, dtype, device, layout)
    out = ops.residual_frames(x, scaled=scaled)
    expected_dtype = torch.float32 if dtype == torch.uint8 else dtype
    assert out.dtype == expected_dtype and out.shape == x.shape
    ref = reference.residual_frames(x, scaled)
    if expected_dtype in (torch.float16, torch.bfloat16):
        _assert_low_precision(out, ref, reference.residual_frames(x.double(), scaled))
    else:
        rtol, atol = tolerance(expected_dtype)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_residual_frames_uint8_out_dtype(out_dtype):
    x = make_clip((2, 3, 6, 5, 4), torch.uint8)
    out = ops.residual_frames(x, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    ref64 = reference.residual_frames(x, True, torch.float64)
    if out_dtype in (torch.float16, torch.bfloat16):
        _assert_low_precision(out, reference.residual_frames(x, True, out_dtype), ref64)
    else:
        torch.testing.assert_close(out.double(), ref64, rtol=1e-6, atol=1e-7)


def test_residual_frames_values_by_hand():
    # frames 0, 1, 3 (uint8 255 = 1.0): roll wraps, so frame 0 sees x0 - x2
    x = torch.tensor([0, 255, 255], dtype=torch.uint8).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(ops.residual_frames(x, scaled=False).flatten(), torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(ops.residual_frames(x).flatten(), torch.tensor([0.0, 1.0, 0.5]))


def test_residual_frames_keeps_channels_last_and_unbatched():
    x = make_clip((2, 3, 4, 6, 6), torch.float32, layout="channels_last")
    assert ops.residual_frames(x).is_contiguous(memory_format=torch.channels_last_3d)
    single = ops.residual_frames(x[0])
    assert single.shape == x[0].shape
    torch.testing.assert_close(single, reference.residual_frames(x[0]))


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_residual_frames_out_buffer(layout):
    x = make_clip((2, 3, 5, 6, 7), torch.uint8)
    buf = make_clip((2, 3, 5, 6, 7), torch.float32, layout=layout)
    ret = ops.residual_frames(x, out=buf)
    assert ret is buf
    torch.testing.assert_close(buf, reference.residual_frames(x))


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_residual_frames_gradcheck(scaled, layout):
    x = make_clip((2, 2, 4, 3, 3), torch.float64, layout=layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.residual_frames(t, scaled=scaled), (x,))


def test_residual_frames_grad_in_low_precision_matches_reference():
    x = make_clip((1, 3, 5, 4, 4), torch.float32).requires_grad_()
    g = torch.randn(1, 3, 5, 4, 4)
    (gx,) = torch.autograd.grad(ops.residual_frames(x, out_dtype=torch.float64), x, g.double())
    assert gx.dtype == torch.float32
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference.residual_frames(xr), xr, g)
    torch.testing.assert_close(gx, gr)


# ---- temporal gather and negatives ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CLIP_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t_out", [1, 7])
def test_temporal_gather_matches_reference(device, dtype, layout, shape, t_out):
    x = make_clip(shape, dtype, device, layout)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, shape[2], (shape[0], t_out), generator=g).to(device)
    out = ops.temporal_gather(x, idx)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1], t_out, shape[3], shape[4])
    torch.testing.assert_close(out, reference.temporal_gather(x, idx), rtol=0, atol=0)
    torch.testing.assert_close(out, reference.temporal_gather_vectorized(x, idx), rtol=0, atol=0)


def test_temporal_gather_out_buffer_and_unbatched():
    x = make_clip((2, 3, 5, 4, 4), torch.float32, layout="channels_last")
    idx = torch.tensor([[4, 0, 0], [1, 1, 2]])
    buf = torch.empty(2, 3, 3, 4, 4)
    assert ops.temporal_gather(x, idx, out=buf) is buf
    torch.testing.assert_close(buf, reference.temporal_gather(x, idx))
    torch.testing.assert_close(ops.temporal_gather(x[1], idx[1]), reference.temporal_gather(x, idx)[1])
    with pytest.raises(RuntimeError, match=r"out must be \[B, C, T_out, H, W\] = \[2, 3, 3, 4, 4\], got \[2, 3, 4, 4, 4\]"):
        ops.temporal_gather(x, idx, out=torch.empty(2, 3, 4, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_temporal_gather_backward_scatter_adds(dtype):
    x = make_clip((2, 3, 5, 3, 4), dtype).requires_grad_()
    idx = torch.tensor([[2, 2, 0, 2, 4, 4], [1, 0, 1, 1, 1, 3]])
    g = torch.randn(2, 3, 6, 3, 4).to(dtype)
    (gx,) = torch.autograd.grad(ops.temporal_gather(x, idx), x, g)
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(reference.temporal_gather(xr, idx), xr, g.double())
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(gx.double(), gr, rtol=rtol, atol=atol * 4)
    # deterministic: the same sum order every time
    (gx2,) = torch.autograd.grad(ops.temporal_gather(x, idx), x, g)
    assert torch.equal(gx, gx2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_temporal_gather_gradcheck(layout):
    x = make_clip((2, 2, 4, 3, 3), torch.float64, layout=layout).requires_grad_()
    idx = torch.tensor([[3, 3, 0, 1, 3], [2, 0, 0, 0, 1]])
    assert torch.autograd.gradcheck(lambda t: ops.temporal_gather(t, idx), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["swap", "permute", "reverse"])
@pytest.mark.parametrize("T", [1, 4, 5, 16])
def test_shuffle_negative_matches_reference(device, mode, T):
    x = make_clip((4, 3, T, 5, 6), torch.float32, device)
    dev = torch.device(device)
    out = ops.shuffle_negative(x, torch.Generator(dev).manual_seed(3), mode)
    ref = reference.shuffle_negative(x, torch.Generator(dev).manual_seed(3), mode)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 16])
def test_repeat_negative_matches_reference(device, T):
    x = make_clip((4, 3, T, 5, 6), torch.uint8, device)
    dev = torch.device(device)
    out, index = ops.repeat_negative(x, torch.Generator(dev).manual_seed(5), return_index=True)
    ref = reference.repeat_negative(x, torch.Generator(dev).manual_seed(5))
    assert torch.equal(out, ref)
    assert (index == index[:, :1]).all()


def test_negatives_are_deterministic_per_seed():
    x = make_clip((8, 3, 16, 4, 4), torch.float32)
    for fn in (ops.repeat_negative, lambda c, g: ops.shuffle_negative(c, g, "swap"), lambda c, g: ops.shuffle_negative(c, g, "permute")):
        a = fn(x, torch.Generator().manual_seed(11))
        b = fn(x, torch.Generator().manual_seed(11))
        c = fn(x, torch.Generator().manual_seed(12))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_repeat_index_is_uniform_over_frames():
    T, n = 16, 32000
    frames = indices.repeat_index(n, T, torch.Generator().manual_seed(0))[:, 0]
    counts = torch.bincount(frames, minlength=T).double()
    expected = n / T
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # 15 degrees of freedom: p < 1e-4 beyond this


@pytest.mark.parametrize("T", [4, 5, 13, 16])
def test_swap_exchanges_exactly_two_distinct_chunks(T):
    bounds = indices.chunk_bounds(T)
    assert [c.shape[2] for c in torch.chunk(torch.zeros(1, 1, T), 4, dim=2)] == [n for _, n in bounds]
    n = len(bounds)
    index = indices.swap_index(4000, T, torch.Generator().manual_seed(1))
    pairs = set()
    for row in index.tolist():
        # walk the row chunk by chunk: each piece must be one whole source chunk, in order
        starts = {s: (s, length) for s, length in bounds}
        order, pos = [], 0
        while pos < T:
            s, length = starts[row[pos]]
            assert row[pos : pos + length] == list(range(s, s + length))
            order.append([b[0] for b in bounds].index(s))
            pos += length
        moved = [i for i, c in enumerate(order) if c != i]
        assert len(moved) == 2 and order[moved[0]] == moved[1] and order[moved[1]] == moved[0]
        pairs.add(tuple(moved))
    assert pairs == {(i, j) for i in range(n) for j in range(i + 1, n)}  # every distinct pair occurs


@pytest.mark.parametrize("T", list(range(1, 18)))
def test_swap_index_concatenates_the_swapped_chunks(T):
    """The index equals the chunks of torch.chunk concatenated in the drawn order (the original's
    ``cat``), from the same draws of the generator."""
    B = 64
    index = indices.swap_index(B, T, torch.Generator().manual_seed(T))
    frames = torch.arange(T)
    pieces = torch.chunk(frames, 4)
    if len(pieces) < 2:
        assert torch.equal(index, frames.expand(B, T))
        return
    i, j = indices.swap_pairs(B, len(pieces), torch.Generator().manual_seed(T))
    for b in range(B):
        order = list(range(len(pieces)))
        order[i[b]], order[j[b]] = order[j[b]], order[i[b]]
        assert index[b].tolist() == torch.cat([pieces[c] for c in order]).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 5])
def test_swap_time_index_matches_reference(device, chunks):
    """The kernel against the tensor-op reference for every T up to 40, equal positions included."""
    for T in range(1, 41):
        n = len(indices.chunk_bounds(T, chunks))
        g = torch.Generator().manual_seed(100 * chunks + T)
        first = torch.randint(0, n, (37,), generator=g).to(device)
        second = torch.randint(0, n, (37,), generator=g).to(device)
        second[:5] = first[:5]  # a chunk "swapped" with itself: the frames in order
        got = ops.swap_time_index(first, second, T, chunks)
        assert got.dtype == torch.long and got.shape == (37, T) and got.device == first.device
        assert torch.equal(got, reference.swap_time_index(first, second, T, chunks)), T
        assert torch.equal(got[:5].cpu(), torch.arange(T).expand(5, T))


@pytest.mark.parametrize("T", [1, 3, 5, 16])
def test_shuffle_negative_swap_draws_as_the_sampler(T):
    """The fused swap negative takes the same draws as indices.swap_index and gathers its frames."""
    clip = make_clip((6, 2, T, 3, 4), torch.float32)
    out, index = ops.shuffle_negative(clip, torch.Generator().manual_seed(4), return_index=True)
    assert torch.equal(index, indices.swap_index(6, T, torch.Generator().manual_seed(4)))
    assert torch.equal(out, reference.temporal_gather(clip, index))
    assert torch.equal(out, reference.shuffle_negative(clip, torch.Generator().manual_seed(4)))


def test_swap_time_index_bad_inputs():
    i = torch.tensor([0, 1, 3])
    j = torch.tensor([2, 0, 1])
    op = torch.ops.iic_ext.swap_time_index
    with pytest.raises(RuntimeError, match="first has an entry out of range"):
        op(torch.tensor([0, 4, 1]), j, 16, 4)
    with pytest.raises(RuntimeError, match="second has a negative entry"):
        op(i, torch.tensor([0, -1, 1]), 16, 4)
    with pytest.raises(RuntimeError, match="first has a negative entry"):  # both bad: first is named
        op(torch.tensor([0, -1, 1]), torch.tensor([0, 9, 1]), 16, 4)
    with pytest.raises(RuntimeError, match=r"entries must lie in \[0, 3\)"):
        op(i, j, 5, 4)  # T = 5 is cut into 3 pieces
    with pytest.raises(RuntimeError, match="first must be int64"):
        op(i.int(), j, 16, 4)
    with pytest.raises(RuntimeError, match="second must be int64"):
        op(i, j.int(), 16, 4)
    with pytest.raises(RuntimeError, match=r"first must be \[B\]"):
        op(i.view(1, 3), j, 16, 4)
    with pytest.raises(RuntimeError, match=r"second must be \[B\] like first"):
        op(i, j[:2], 16, 4)
    with pytest.raises(RuntimeError, match="num_frames must be at least 1"):
        op(i, j, 0, 4)
    with pytest.raises(RuntimeError, match="chunks must be at least 1"):
        op(i, j, 16, 0)
    assert op(i[:0], j[:0], 16, 4).shape == (0, 16)


def test_permute_is_never_identity_and_reverse_reverses():
    idx = indices.permute_index(2000, 3, torch.Generator().manual_seed(0))
    assert not (idx == torch.arange(3)).all(dim=1).any()
    assert sorted(map(tuple, idx.unique(dim=0).tolist())) == sorted(
        [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    )
    assert indices.reverse_index(2, 4).tolist() == [[3, 2, 1, 0]] * 2
    with pytest.raises(ValueError, match="mode"):
        indices.shuffle_index(2, 4, mode="bogus")


# ---- fused IIC views ------------------------------------------------------------------------------


def _assert_views_match(got, want):
    """The three views equal the reference's to the output dtype's rounding, contiguous."""
    for g, w in zip(got, want):
        assert g.is_contiguous() and g.dtype == w.dtype
        rtol, atol = tolerance(w.dtype)
        torch.testing.assert_close(g, w, rtol=max(rtol, 1e-6), atol=max(atol, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 9), (1, 3, 1, 4, 4), (3, 3, 16, 6, 5)])
@pytest.mark.parametrize("norm", [False, True])
def test_iic_views_match_reference(device, dtype, layout, shape, norm):
    x = make_clip(shape, dtype, device, layout)
    idx = indices.shuffle_index(shape[0], shape[2], torch.Generator().manual_seed(2), "permute").to(device)
    mean, std = ([0.45, 0.4, 0.35], [0.2, 0.25, 0.3]) if norm else (None, None)
    got = ops.iic_views(x, idx, mean=mean, std=std)
    want = reference.iic_views(x, idx, mean, std)
    _assert_views_match(got, want)


@pytest.mark.parametrize("C", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["dense", "gapped"])
@pytest.mark.parametrize("W", [7, 37])
def test_iic_views_channels_last_any_channel_count(C, dtype, rows, W):
    """Pixels of C interleaved channels (a decoded [B, T, H, W, C] batch), with dense rows or rows that
    have gaps between them, for every channel count the kernel special-cases and one beyond; W = 37
    takes the 16-pixel steps of the RGB path and a tail."""
    B, T, H = 2, 5, 6
    frames = make_clip((B, T, 2 * H if rows == "gapped" else H, W, C), dtype)
    frames = frames[:, :, ::2] if rows == "gapped" else frames
    x = frames.permute(0, 4, 1, 2, 3)
    idx = indices.shuffle_index(B, T, torch.Generator().manual_seed(3), "permute")
    mean, std = [0.1 * (c + 1) for c in range(C)], [0.2 + 0.05 * c for c in range(C)]
    got = ops.iic_views(x, idx, mean=mean, std=std)
    want = reference.iic_views(x, idx, mean, std)
    _assert_views_match(got, want)


def test_iic_views_from_decoded_frames_layout():
    frames = make_clip((2, 6, 8, 10, 3), torch.uint8)  # [B, T, H, W, C] as decoded
    idx = indices.repeat_index(2, 6, torch.Generator().manual_seed(0))
    got = ops.iic_views(frames, idx, layout="BTHWC")
    want = reference.iic_views(frames.permute(0, 4, 1, 2, 3), idx)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="layout"):
        ops.iic_views(frames, idx, layout="NHWC")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_iic_views_out_dtype(out_dtype):
    x = make_clip((2, 3, 5, 4, 4), torch.uint8)
    idx = indices.repeat_index(2, 5, torch.Generator().manual_seed(0))
    got = ops.iic_views(x, idx, out_dtype=out_dtype)
    ref64 = reference.iic_views(x, idx, out_dtype=torch.float64)
    ref_low = reference.iic_views(x, idx, out_dtype=out_dtype)
    for g, w64, wl in zip(got, ref64, ref_low):
        assert g.dtype == out_dtype
        if out_dtype == torch.float64:
            torch.testing.assert_close(g, w64, rtol=1e-6, atol=1e-7)
        else:
            _assert_low_precision(g, wl, w64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_iic_views_into_buffers(device, layout, out_dtype):
    """out= writes what the allocating call returns, twice over the same buffers (stale contents are
    overwritten), and returns the buffers themselves."""
    x = make_clip((2, 3, 6, 5, 9), torch.uint8, device, layout)
    mean, std = [0.45, 0.4, 0.35], [0.2, 0.25, 0.3]
    bufs = (torch.full((2, 3, 6, 5, 9), float("nan"), dtype=out_dtype, device=device),
            torch.full((2, 3, 6, 5, 9), float("nan"), dtype=out_dtype, device=device),
            torch.full((2, 3, 4, 5, 9), float("nan"), dtype=out_dtype, device=device))
    for seed in (0, 1):
        idx = indices.shuffle_index(2, 6, torch.Generator().manual_seed(seed), "permute")[:, :4].to(device)
        got = ops.iic_views(x, idx, mean=mean, std=std, out=bufs)
        assert got is bufs
        want = ops.iic_views(x, idx, mean=mean, std=std, out_dtype=out_dtype)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_iic_views_out_bad_buffers():
    x = make_clip((2, 3, 5, 4, 4), torch.uint8)
    idx = indices.repeat_index(2, 5, torch.Generator().manual_seed(0))

    def bufs(**change):
        b = {"rgb": torch.empty(2, 3, 5, 4, 4), "residual": torch.empty(2, 3, 5, 4, 4),
             "negative": torch.empty(2, 3, 5, 4, 4)}
        b.update(change)
        return b

    op = torch.ops.iic_ext.iic_views.out
    with pytest.raises(RuntimeError, match=r"negative must have shape \[2, 3, 5, 4, 4\]"):
        op(x, idx, **bufs(negative=torch.empty(2, 3, 4, 4, 4)))
    with pytest.raises(RuntimeError, match="rgb must have shape"):
        op(x, idx, **bufs(rgb=torch.empty(2, 3, 5, 4, 5)))
    with pytest.raises(RuntimeError, match="residual must have rgb's dtype"):
        op(x, idx, **bufs(residual=torch.empty(2, 3, 5, 4, 4, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="rgb must be float16, bfloat16, float32 or float64"):
        op(x, idx, **bufs(rgb=torch.empty(2, 3, 5, 4, 4, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="residual must be contiguous"):
        op(x, idx, **bufs(residual=torch.empty(2, 3, 5, 4, 4).to(memory_format=torch.channels_last_3d)))
    shared = torch.empty(2, 3, 5, 4, 4)
    with pytest.raises(RuntimeError, match="memory location"):
        op(x, idx, **bufs(rgb=shared, residual=shared))
    xf = torch.rand(2, 3, 5, 4, 4)
    with pytest.raises(RuntimeError, match="memory location"):
        op(xf, idx, **bufs(negative=xf))
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, torch.full((2, 5), 9), **bufs())
    with pytest.raises(ValueError, match="out_dtype"):
        ops.iic_views(x, idx, out_dtype=torch.float64, out=tuple(bufs().values()))


def test_iic_views_unscaled_residual_is_the_finetuning_input():
    x = make_clip((2, 3, 5, 4, 4), torch.uint8)
    idx = indices.repeat_index(2, 5)
    _, res, _ = ops.iic_views(x, idx, scaled=False)
    torch.testing.assert_close(res, reference.residual_frames(x, scaled=False))


# ---- empty batches, registration checks, compile --------------------------------------------------


def test_empty_batch_returns_empty():
    x = torch.zeros(0, 3, 4, 5, 5, dtype=torch.uint8)
    idx = torch.zeros(0, 4, dtype=torch.long)
    assert ops.residual_frames(x).shape == (0, 3, 4, 5, 5)
    assert ops.temporal_gather(x, idx).shape == (0, 3, 4, 5, 5)
    assert ops.repeat_negative(x).shape == (0, 3, 4, 5, 5)
    assert ops.shuffle_negative(x).shape == (0, 3, 4, 5, 5)
    assert [v.shape for v in ops.iic_views(x, idx)] == [(0, 3, 4, 5, 5)] * 3
    xf = torch.zeros(0, 3, 4, 5, 5, requires_grad=True)
    ops.residual_frames(xf).sum().backward()
    assert xf.grad.shape == xf.shape


def _opcheck_samples():
    x = make_clip((2, 3, 5, 4, 6), torch.float64, layout="channels_last").requires_grad_()
    xu = make_clip((2, 3, 5, 4, 6), torch.uint8, layout="sliced")
    idx = torch.tensor([[4, 0, 0], [1, 2, 3]])
    g = torch.rand(2, 3, 3, 4, 6, dtype=torch.float64)
    return [
        (torch.ops.iic_ext.residual_frames.default, (x, True, None)),
        (torch.ops.iic_ext.residual_frames.default, (xu, False, torch.float32)),
        (torch.ops.iic_ext.residual_frames.out, (xu, True), {"out": torch.empty(2, 3, 5, 4, 6)}),
        (torch.ops.iic_ext._residual_frames_backward.default, (x.detach(), True)),
        (torch.ops.iic_ext.temporal_gather.default, (x, idx)),
        (torch.ops.iic_ext.temporal_gather.default, (xu, idx)),
        (torch.ops.iic_ext.temporal_gather.out, (xu, idx), {"out": torch.empty(2, 3, 3, 4, 6, dtype=torch.uint8)}),
        (torch.ops.iic_ext._temporal_gather_backward.default, (g, idx, 5)),
        (torch.ops.iic_ext.iic_views.default, (xu, idx, [0.5, 0.4, 0.3], [0.2, 0.2, 0.25], True, None)),
        (torch.ops.iic_ext.iic_views.default, (x.detach(), idx, None, None, False, torch.float32)),
        (torch.ops.iic_ext.iic_views.out, (xu, idx, [0.5, 0.4, 0.3], None, True),
         {"rgb": torch.empty(2, 3, 5, 4, 6), "residual": torch.empty(2, 3, 5, 4, 6),
          "negative": torch.empty(2, 3, 3, 4, 6)}),
        (torch.ops.iic_ext.swap_time_index.default, (torch.tensor([0, 3, 2]), torch.tensor([1, 0, 2]), 16, 4)),
        (torch.ops.iic_ext.swap_time_index.default, (torch.tensor([2, 0]), torch.tensor([0, 1]), 5, 4)),
    ]


@pytest.mark.parametrize("sample", range(13))
def test_opcheck(sample):
    op, args, *kw = _opcheck_samples()[sample]
    torch.library.opcheck(op, args, kw[0] if kw else {})


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x = make_clip((2, 3, 6, 8, 8), torch.float32, layout="channels_last")
    xu = make_clip((2, 3, 6, 8, 8), torch.uint8)
    idx = indices.repeat_index(2, 6, torch.Generator().manual_seed(0))

    def step(x, xu, idx):
        r = ops.residual_frames(x)
        n = ops.temporal_gather(x, idx)
        rgb, res, neg = ops.iic_views(xu, idx)
        swap = ops.swap_time_index(idx[:, 0] % 3, idx[:, 1] % 3, 6, 3)
        return r.sum() + n.sum() + rgb.sum() + res.sum() + neg.sum() + swap.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, xu, idx), step(x, xu, idx))


# ---- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = make_clip((2, 3, 5, 4, 4), torch.float32)
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"clip must be \[B, C, T, H, W\]"):
        ops.residual_frames(torch.zeros(3, 4, 4))
    with pytest.raises(RuntimeError, match=r"clip must be \[B, C, T, H, W\]"):
        torch.ops.iic_ext.residual_frames(torch.zeros(3, 5, 4, 4))
    with pytest.raises(RuntimeError, match="clip must be uint8, float16"):
        ops.residual_frames(x.to(torch.int32))
    with pytest.raises(RuntimeError, match="at least one frame"):
        ops.residual_frames(torch.zeros(2, 3, 0, 4, 4))
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        ops.residual_frames(x, out_dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out must have the shape"):
        ops.residual_frames(x, out=torch.empty(2, 3, 4, 4, 4))
    with pytest.raises(RuntimeError, match="out range|out of range"):
        ops.temporal_gather(x, torch.full((2, 3), 5))
    with pytest.raises(RuntimeError, match="negative entry"):
        ops.temporal_gather(x, torch.tensor([[0, -1], [0, 0]]))
    with pytest.raises(RuntimeError, match="time_index must be int64"):
        ops.temporal_gather(x, idx.int())
    with pytest.raises(RuntimeError, match="one row per clip"):
        ops.temporal_gather(x, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"time_index must be \[B, T_out\]"):
        torch.ops.iic_ext.temporal_gather(x, torch.zeros(2, 5, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.iic_views(x, torch.full((2, 5), 7))
    with pytest.raises(RuntimeError, match="mean must have one value per channel"):
        ops.iic_views(x, idx, mean=[0.5])
    with pytest.raises(RuntimeError, match="std must be positive"):
        ops.iic_views(x, idx, std=[1.0, 0.0, 1.0])
    buf = torch.rand(2 * 3 * 5 * 4 * 4 + 1)  # out one element past clip in the same memory
    clip, shifted = buf[:-1].view(2, 3, 5, 4, 4), buf[1:].view(2, 3, 5, 4, 4)
    with pytest.raises(RuntimeError, match="memory location"):
        ops.residual_frames(clip, out=shifted)
    with pytest.raises(RuntimeError, match="memory location"):
        ops.temporal_gather(clip, idx, out=shifted)
    with pytest.raises(RuntimeError, match="num_frames"):
        torch.ops.iic_ext._temporal_gather_backward(torch.zeros(2, 3, 5, 4, 4), idx, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    x = make_clip((2, 3, 5, 4, 4), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="same device"):
        ops.temporal_gather(x, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="same device"):
        ops.iic_views(x, torch.zeros(2, 5, dtype=torch.long))


def test_reference_fallback_warns_once(monkeypatch):
    from iic_ext.ops import _library

    monkeypatch.setattr(_library, "HAS_C", False)
    monkeypatch.setattr(_library, "_warned", False)
    monkeypatch.setattr(_library, "LOAD_ERROR", ImportError("test"))
    x = make_clip((2, 3, 5, 4, 4), torch.uint8)
    with pytest.warns(RuntimeWarning, match="falling back to the pure-PyTorch reference"):
        a = ops.residual_frames(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ops.temporal_gather(x, torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(a, reference.residual_frames(x))
    assert b.shape == (2, 3, 3, 4, 4)


# ---- fuzz -----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(0, 3),
    C=st.integers(1, 4),
    T=st.integers(1, 9),
    H=st.integers(1, 6),
    W=st.integers(1, 7),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.float64, torch.float16]),
    perm=st.permutations(range(5)),
    step_w=st.integers(1, 2),
    t_out=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_fuzz_views_against_reference(B, C, T, H, W, dtype, perm, step_w, t_out, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [B, C, T, H, W * step_w]
    base_shape = [shape[p] for p in perm]
    if dtype == torch.uint8:
        base = torch.randint(0, 256, base_shape, generator=g, dtype=torch.uint8)
    else:
        base = torch.rand(base_shape, generator=g, dtype=torch.float64).to(dtype)
    x = base.permute(*[perm.index(i) for i in range(5)])[..., ::step_w]  # arbitrary strides
    idx = torch.randint(0, T, (B, t_out), generator=g)
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    rtol, atol = tolerance(out_dtype)
    atol = max(atol, 1e-6)
    torch.testing.assert_close(ops.residual_frames(x), reference.residual_frames(x), rtol=rtol, atol=atol)
    torch.testing.assert_close(ops.temporal_gather(x, idx), reference.temporal_gather_vectorized(x, idx), rtol=0, atol=0)
    for got, want in zip(ops.iic_views(x, idx), reference.iic_views(x, idx)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
