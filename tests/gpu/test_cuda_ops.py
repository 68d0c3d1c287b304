"""CUDA kernels against the CPU kernels and the pure-PyTorch reference (runs only with a GPU).

Every op is run on the same inputs on both devices: results must agree to rounding (exactly where
both kernels evaluate the same expressions in the same order), output dtypes and memory formats must
match, and backward scatters and the bank update must be deterministic. The NCE tests skip until the
CPU kernels of the memory-bank ops are registered.
"""
import math
import os

import pytest
import torch

from iic_ext import ops
from iic_ext.ops import indices, reference

from conftest import CLIP_DTYPES, FLOAT_DTYPES, LAYOUTS, make_clip, tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"
# B = 0, T = 1, odd H/W, a single pixel, a long clip
SHAPES = [(0, 3, 4, 5, 5), (1, 3, 1, 4, 5), (2, 3, 5, 7, 9), (3, 1, 16, 8, 8), (2, 3, 4, 1, 1), (2, 2, 8, 16, 16)]


def _cuda_copy(x):
    """The same values with the same strides on the GPU (``.to`` keeps dense layouts, not slices)."""
    buf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=CUDA)
    buf.copy_(x)
    return buf


def _sliced_like(shape, dtype, device, offset=1):
    """An output buffer with gaps between rows and a start that breaks vector alignment."""
    B, C, T, H, W = shape
    big = torch.full((B, C, T, H, W + 3), -7, dtype=dtype, device=device)
    return big[..., offset : W + offset]


def _close(got, want, dtype):
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=max(rtol, 1e-6), atol=max(atol, 1e-6))


# ---- residual frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CLIP_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaled", [True, False])
def test_residual_frames_cuda_matches_cpu(dtype, layout, shape, scaled):
    x = make_clip(shape, dtype, "cpu", layout)
    xc = _cuda_copy(x)
    got = torch.ops.iic_ext.residual_frames(xc, scaled, None)
    want = torch.ops.iic_ext.residual_frames(x, scaled, None)
    assert got.device.type == CUDA and got.dtype == want.dtype and got.shape == want.shape
    assert got.stride() == want.stride()  # clip's memory format on both devices
    _close(got, want, want.dtype)
    if want.dtype in (torch.float32, torch.float64):
        _close(got, reference.residual_frames(xc, scaled), want.dtype)


@pytest.mark.parametrize("in_dtype", CLIP_DTYPES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_residual_frames_cuda_dtype_pairs(in_dtype, out_dtype):
    x = make_clip((2, 3, 5, 6, 8), in_dtype, "cpu", "channels_last")
    got = torch.ops.iic_ext.residual_frames(x.to(CUDA), True, out_dtype)
    want = torch.ops.iic_ext.residual_frames(x, True, out_dtype)
    assert got.dtype == out_dtype
    _close(got, want, out_dtype)


@pytest.mark.parametrize("in_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("out_kind", ["contiguous", "channels_last", "sliced", "misaligned"])
def test_residual_frames_out_any_strides(in_layout, out_kind):
    shape = (2, 3, 5, 6, 8)
    x = _cuda_copy(make_clip(shape, torch.uint8, "cpu", in_layout))
    if out_kind == "contiguous":
        out = torch.empty(shape, device=CUDA)
    elif out_kind == "channels_last":
        out = torch.empty(shape, device=CUDA).contiguous(memory_format=torch.channels_last_3d)
    elif out_kind == "sliced":
        out = _sliced_like(shape, torch.float32, CUDA, offset=0)
    else:  # dense but starting one element past a 16-byte boundary
        out = torch.empty(int(torch.tensor(shape).prod()) + 1, device=CUDA)[1:].view(shape)
    ret = ops.residual_frames(x, out=out)
    assert ret is out
    _close(out, reference.residual_frames(x.cpu()), torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "expanded"])
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("scaled", [True, False])
def test_residual_frames_backward_cuda_matches_cpu(dtype, layout, T, scaled):
    shape = (2, 3, T, 5, 7)
    if layout == "expanded":  # what autograd hands over for out.sum(): all strides 0
        g = torch.ones((), dtype=dtype).expand(shape)
    else:
        g = make_clip(shape, dtype, "cpu", layout)
    gc = torch.ones((), dtype=dtype, device=CUDA).expand(shape) if layout == "expanded" else _cuda_copy(g)
    got = torch.ops.iic_ext._residual_frames_backward(gc, scaled)
    want = torch.ops.iic_ext._residual_frames_backward(g, scaled)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    _close(got, want, dtype)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_residual_frames_gradcheck_cuda(scaled, layout):
    x = _cuda_copy(make_clip((2, 2, 4, 3, 3), torch.float64, "cpu", layout)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.residual_frames(t, scaled=scaled), (x,))


# ---- temporal gather ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CLIP_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t_out", [1, 7])
def test_temporal_gather_cuda_matches_cpu(dtype, layout, shape, t_out):
    x = make_clip(shape, dtype, "cpu", layout)
    idx = torch.randint(0, shape[2], (shape[0], t_out), generator=torch.Generator().manual_seed(1))
    got = torch.ops.iic_ext.temporal_gather(_cuda_copy(x), idx.to(CUDA))
    want = torch.ops.iic_ext.temporal_gather(x, idx)
    assert got.dtype == dtype and got.stride() == want.stride()
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu(), reference.temporal_gather(x, idx))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("in_layout", ["contiguous", "channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("out_kind", ["contiguous", "channels_last", "sliced", "misaligned"])
@pytest.mark.parametrize("W", [8, 7])
def test_temporal_gather_out_any_strides(dtype, in_layout, out_kind, W):
    # block copies (planes, channels-last frames) in every unit width, and the strided fallback
    shape = (2, 3, 6, 4, W)
    x = _cuda_copy(make_clip(shape, dtype, "cpu", in_layout))
    idx = torch.tensor([[5, 0, 0, 3], [1, 1, 4, 2]], device=CUDA)
    oshape = (2, 3, 4, 4, W)
    if out_kind == "contiguous":
        out = torch.empty(oshape, dtype=dtype, device=CUDA)
    elif out_kind == "channels_last":
        out = torch.empty(oshape, dtype=dtype, device=CUDA).contiguous(memory_format=torch.channels_last_3d)
    elif out_kind == "sliced":
        out = _sliced_like(oshape, dtype, CUDA, offset=0)
    else:
        n = int(torch.tensor(oshape).prod())
        out = torch.empty(n + 1, dtype=dtype, device=CUDA)[1:].view(oshape)
    ops.temporal_gather(x, idx, out=out)
    assert torch.equal(out.cpu(), reference.temporal_gather(x.cpu(), idx.cpu()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "expanded"])
@pytest.mark.parametrize("T", [1, 5])
def test_temporal_gather_backward_cuda_matches_cpu(dtype, layout, T):
    B, C, To, H, W = 3, 2, 9, 5, 7
    idx = torch.randint(0, T, (B, To), generator=torch.Generator().manual_seed(2))
    if layout == "expanded":
        g = torch.ones((), dtype=dtype).expand(B, C, To, H, W)
        gc = torch.ones((), dtype=dtype, device=CUDA).expand(B, C, To, H, W)
    else:
        g = make_clip((B, C, To, H, W), dtype, "cpu", layout)
        gc = _cuda_copy(g)
    got = torch.ops.iic_ext._temporal_gather_backward(gc, idx.to(CUDA), T)
    want = torch.ops.iic_ext._temporal_gather_backward(g, idx, T)
    assert got.dtype == dtype and got.is_contiguous()
    # same additions in the same (t) order in the same accumulation type as the CPU kernel
    assert torch.equal(got.cpu(), want)
    again = torch.ops.iic_ext._temporal_gather_backward(gc, idx.to(CUDA), T)
    assert torch.equal(got, again)


def test_temporal_gather_backward_unused_and_repeated_frames():
    g = torch.ones(1, 1, 2, 1, 1, device=CUDA)
    out = torch.ops.iic_ext._temporal_gather_backward(g, torch.tensor([[2, 2]], device=CUDA), 4)
    assert out.flatten().tolist() == [0.0, 0.0, 2.0, 0.0]
    g = torch.zeros(0, 3, 2, 4, 4, device=CUDA)
    out = torch.ops.iic_ext._temporal_gather_backward(g, torch.zeros(0, 2, dtype=torch.long, device=CUDA), 5)
    assert out.shape == (0, 3, 5, 4, 4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_temporal_gather_gradcheck_cuda(layout):
    x = _cuda_copy(make_clip((2, 2, 4, 3, 3), torch.float64, "cpu", layout)).requires_grad_()
    idx = torch.tensor([[3, 3, 0, 1, 3], [2, 0, 0, 0, 1]], device=CUDA)
    assert torch.autograd.gradcheck(lambda t: ops.temporal_gather(t, idx), (x,))


@pytest.mark.parametrize("mode", ["swap", "permute", "reverse"])
def test_negatives_cuda_match_cpu(mode):
    x = make_clip((4, 3, 16, 6, 5), torch.uint8, "cpu", "channels_last")
    idx = indices.shuffle_index(4, 16, torch.Generator().manual_seed(3), mode)
    assert torch.equal(ops.temporal_gather(x.to(CUDA), idx.to(CUDA)).cpu(), ops.temporal_gather(x, idx))


@pytest.mark.parametrize("T", [1, 5, 16, 33])
def test_shuffle_negative_swap_cuda_generator(T):
    """On a CUDA generator the swap index is drawn and built on the device, as indices.swap_index draws it."""
    x = make_clip((8, 3, T, 4, 5), torch.float32, "cpu").to(CUDA)
    out, index = ops.shuffle_negative(x, torch.Generator(device=CUDA).manual_seed(5), return_index=True)
    want = indices.swap_index(8, T, torch.Generator(device=CUDA).manual_seed(5))
    assert index.device == want.device and torch.equal(index, want)
    assert torch.equal(out, ops.reference.temporal_gather(x, want))


def test_swap_time_index_cuda_checks_ranges():
    first = torch.tensor([0, 4], device=CUDA)
    with pytest.raises(RuntimeError, match="first has an entry out of range"):
        torch.ops.iic_ext.swap_time_index(first, torch.tensor([1, 0], device=CUDA), 16, 4)
    with pytest.raises(RuntimeError, match="second has a negative entry"):  # both read back in one copy
        torch.ops.iic_ext.swap_time_index(first.clamp(max=3), torch.tensor([1, -2], device=CUDA), 16, 4)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.iic_ext.swap_time_index(first, torch.tensor([1, 0]), 16, 4)


# ---- fused IIC views ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [True, False])
def test_iic_views_out_cuda_matches_cpu(aligned, layout):
    """out= on CUDA writes what the CPU op computes, into aligned buffers (the packed kernels, W-rows or
    channels-last pixels) and into buffers one element off alignment (the element kernel)."""
    x = make_clip((3, 3, 8, 6, 16), torch.uint8, "cpu", layout)
    idx = torch.randint(0, 8, (3, 5), generator=torch.Generator().manual_seed(6))
    want = ops.iic_views(x, idx, mean=[0.45, 0.4, 0.35], std=[0.2, 0.25, 0.3])
    shapes = [w.shape for w in want]
    off = 0 if aligned else 1
    flat = [torch.full((off + w.numel(),), float("nan"), device=CUDA) for w in want]
    bufs = tuple(f[off:].view(sh) for f, sh in zip(flat, shapes))
    got = ops.iic_views(x.to(CUDA), idx.to(CUDA), mean=[0.45, 0.4, 0.35], std=[0.2, 0.25, 0.3], out=bufs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", CLIP_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["BTHWC", "BTHWC crop"])
# W % 4 == 0 (8, 12) takes the packed kernels where the layout allows, W = 9 and 5 the element kernel
@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 5), (1, 3, 1, 4, 4), (2, 3, 5, 7, 9), (3, 3, 16, 6, 5),
                                   (2, 3, 5, 6, 8), (3, 3, 4, 3, 12)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("scaled", [True, False])
def test_iic_views_cuda_matches_cpu(dtype, layout, shape, norm, scaled):
    B, C, T, H, W = shape
    if layout == "BTHWC":  # decoded frames [B, T, H, W, C] seen as [B, C, T, H, W]
        x = make_clip((B, T, H, W, C), dtype, "cpu").permute(0, 4, 1, 2, 3)
    elif layout == "BTHWC crop":  # a crop of larger decoded frames: pixels packed, rows apart, odd offset
        frames = make_clip((B, T, H + 2, W + 3, C), dtype, "cpu")
        x = frames[:, :, 1 : H + 1, 3:].permute(0, 4, 1, 2, 3)
    else:
        x = make_clip(shape, dtype, "cpu", layout)
    # the same view on the GPU (a crop is taken there, so its start keeps its offset)
    x_cuda = frames.to(CUDA)[:, :, 1 : H + 1, 3:].permute(0, 4, 1, 2, 3) if layout == "BTHWC crop" else _cuda_copy(x)
    assert x_cuda.stride() == x.stride()
    idx = torch.randint(0, shape[2], (shape[0], 6), generator=torch.Generator().manual_seed(4))
    mean, std = ([0.45, 0.4, 0.35][: shape[1]], [0.2, 0.25, 0.3][: shape[1]]) if norm else (None, None)
    got = torch.ops.iic_ext.iic_views(x_cuda, idx.to(CUDA), mean, std, scaled, None)
    want = torch.ops.iic_ext.iic_views(x, idx, mean, std, scaled, None)
    ref = reference.iic_views(x, idx, mean, std, scaled)
    for g, w, r in zip(got, want, ref):
        assert g.is_cuda and g.is_contiguous() and g.dtype == w.dtype and g.shape == w.shape
        _close(g, w, w.dtype)
        if w.dtype in (torch.float32, torch.float64):
            _close(g, r, w.dtype)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_iic_views_cuda_out_dtype(out_dtype):
    x = make_clip((2, 3, 5, 4, 6), torch.uint8, "cpu", "sliced")
    idx = indices.repeat_index(2, 5, torch.Generator().manual_seed(0))
    got = torch.ops.iic_ext.iic_views(_cuda_copy(x), idx.to(CUDA), [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], True, out_dtype)
    want = torch.ops.iic_ext.iic_views(x, idx, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], True, out_dtype)
    for g, w in zip(got, want):
        assert g.dtype == out_dtype
        _close(g, w, out_dtype)


def test_iic_views_many_channels():
    x = make_clip((2, 20, 3, 4, 4), torch.uint8, "cpu")
    idx = torch.tensor([[2, 0], [1, 1]])
    got = torch.ops.iic_ext.iic_views(x.to(CUDA), idx.to(CUDA), None, None, True, None)
    for g, w in zip(got, torch.ops.iic_ext.iic_views(x, idx, None, None, True, None)):
        _close(g, w, torch.float32)


# ---- bad inputs: errors, never crashes --------------------------------------------------------------


def test_bad_inputs_raise_on_cuda():
    x = make_clip((2, 3, 5, 4, 4), torch.float32, CUDA)
    idx = torch.zeros(2, 5, dtype=torch.long, device=CUDA)
    with pytest.raises(RuntimeError, match="same device"):
        ops.temporal_gather(x, idx.cpu())
    with pytest.raises(RuntimeError, match="same device"):
        ops.temporal_gather(x.cpu(), idx)
    with pytest.raises(RuntimeError, match="same device"):
        ops.iic_views(x, idx.cpu())
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.iic_ext._temporal_gather_backward(x, idx.cpu(), 5)
    with pytest.raises(RuntimeError, match="same device"):
        ops.residual_frames(x, out=torch.empty(2, 3, 5, 4, 4))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.temporal_gather(x, torch.full((2, 3), 5, device=CUDA))
    with pytest.raises(RuntimeError, match="negative entry"):
        ops.temporal_gather(x, torch.tensor([[0, -1], [0, 0]], device=CUDA))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.iic_views(x, torch.full((2, 5), 7, device=CUDA))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.iic_ext._temporal_gather_backward(x, torch.full((2, 5), 3, device=CUDA), 3)
    with pytest.raises(RuntimeError, match="time_index must be int64"):
        ops.temporal_gather(x, idx.int())
    with pytest.raises(RuntimeError, match="at least one frame"):  # T_out = 0, as on the CPU
        torch.ops.iic_ext._temporal_gather_backward(torch.zeros(2, 3, 0, 4, 4, device=CUDA), idx[:, :0], 5)
    with pytest.raises(RuntimeError, match="at most"):
        ops.iic_views(make_clip((2, 20, 3, 4, 4), torch.uint8, CUDA), idx[:, :2], mean=[0.5] * 20)
    with pytest.raises(RuntimeError, match="out must have the shape"):
        ops.residual_frames(x, out=torch.empty(2, 3, 4, 4, 4, device=CUDA))
    with pytest.raises(RuntimeError, match="out must not be clip"):
        torch.ops.iic_ext.residual_frames.out(x, True, out=x)
    base = torch.rand(2 * x.numel(), device=CUDA)
    with pytest.raises(RuntimeError, match="single memory location"):  # out overlapping the input
        torch.ops.iic_ext.residual_frames.out(base[: x.numel()].view(x.shape), True, out=base[1 : x.numel() + 1].view(x.shape))
    # the device is still healthy
    torch.cuda.synchronize()
    torch.testing.assert_close(ops.residual_frames(x), reference.residual_frames(x))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x = make_clip((2, 3, 5, 4, 4), torch.uint8, "cuda:1")
    idx = torch.tensor([[4, 0], [1, 2]], device="cuda:1")
    assert ops.residual_frames(x).device == x.device
    assert torch.equal(ops.temporal_gather(x, idx).cpu(), ops.temporal_gather(x.cpu(), idx.cpu()))


# ---- 64-bit indexing (large tensors; opt in with IIC_EXT_LARGE_TESTS=1) --------------------------------


@pytest.mark.skipif(os.environ.get("IIC_EXT_LARGE_TESTS") != "1", reason="set IIC_EXT_LARGE_TESTS=1")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_views_beyond_int32_indexing(layout):
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip("needs ~48 GiB of free GPU memory")
    if layout == "contiguous":
        # 2 * 32768 * 32769 > 2^31 elements: the kernels must take their 64-bit index path (W odd: the
        # element kernels)
        x = torch.randint(0, 256, (1, 1, 2, 32768, 32769), dtype=torch.uint8, device=CUDA)
        mean, std = [0.5], [0.25]
    else:
        # decoded RGB frames, channels adjacent (the channels-last kernel): 3 * 2 * 16384 * 22000 > 2^31
        # positions of rgb alone
        x = torch.randint(0, 256, (1, 2, 16384, 22000, 3), dtype=torch.uint8, device=CUDA).permute(0, 4, 1, 2, 3)
        mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    tail = x[..., -3:, :]  # time mixes only along T, so the last rows can be checked on their own
    idx = torch.tensor([[1, 0, 1]], device=CUDA)
    if layout == "contiguous":
        r = ops.residual_frames(x)
        torch.testing.assert_close(r[..., -3:, :], reference.residual_frames(tail))
        del r
        gth = ops.temporal_gather(x, idx)
        assert torch.equal(gth[..., -3:, :], reference.temporal_gather(tail, idx))
        del gth
    rgb, res, neg = ops.iic_views(x, idx, mean=mean, std=std)
    want = reference.iic_views(tail, idx, mean, std)
    for g, w in zip((rgb, res, neg), want):
        torch.testing.assert_close(g[..., -3:, :], w)


# ---- memory bank (NCE) ----------------------------------------------------------------------------


def _has_cpu(name):
    return hasattr(torch.ops.iic_ext, name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"iic_ext::{name}", "CPU")


nce = pytest.mark.skipif(not _has_cpu("bank_scores"), reason="the CPU kernels of the NCE ops are not built")
NCE_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float16),
              (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32), (torch.float32, torch.float64)]


def _nce_tol(*dtypes):
    if torch.bfloat16 in dtypes:
        return dict(rtol=2e-2, atol=2e-2)
    if torch.float16 in dtypes:
        return dict(rtol=2e-3, atol=2e-3)
    if all(d == torch.float64 for d in dtypes) or torch.float64 in dtypes:
        return dict(rtol=1e-6, atol=1e-6)
    return dict(rtol=1e-5, atol=1e-5)


def _bank(N, D, dtype, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.nn.functional.normalize(torch.randn(N, 2 * D if strided else D, generator=g, dtype=torch.float64), dim=1)
    b = b[:, ::2] if strided else b
    return b.to(dtype)


def _dev(t):
    return None if t is None else _cuda_copy(t)


@nce
@pytest.mark.parametrize("feat_dtype,bank_dtype", NCE_DTYPES)
@pytest.mark.parametrize("B,K,D,N", [(0, 5, 16, 10), (4, 1, 128, 50), (3, 17, 33, 40), (5, 300, 128, 64), (2, 4100, 64, 9000)])
@pytest.mark.parametrize("strided", [False, True])
def test_bank_scores_cuda_matches_cpu(feat_dtype, bank_dtype, B, K, D, N, strided):
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(B, D, generator=g, dtype=torch.float64).to(feat_dtype)
    bank = _bank(N, D, bank_dtype, strided)
    idx = torch.randint(0, N, (B, K), generator=g)
    got = torch.ops.iic_ext.bank_scores(_dev(feat), _dev(bank), _dev(idx))
    want = torch.ops.iic_ext.bank_scores(feat, bank, idx)
    assert got.dtype == want.dtype == feat_dtype and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, **_nce_tol(feat_dtype, bank_dtype))
    if hasattr(reference, "bank_scores"):
        torch.testing.assert_close(got.cpu(), reference.bank_scores(feat, bank, idx), **_nce_tol(feat_dtype, bank_dtype))
    grad = torch.randn(B, K, generator=g, dtype=torch.float64).to(feat_dtype)
    gf = torch.ops.iic_ext._bank_scores_backward(_dev(grad), _dev(bank), _dev(idx), feat_dtype)
    gw = torch.ops.iic_ext._bank_scores_backward(grad, bank, idx, feat_dtype)
    assert gf.dtype == feat_dtype and gf.shape == (B, D)
    tol = _nce_tol(feat_dtype, bank_dtype)
    scale = max(1.0, K ** 0.5)  # sums over K in another order
    torch.testing.assert_close(gf.cpu(), gw, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)
    again = torch.ops.iic_ext._bank_scores_backward(_dev(grad), _dev(bank), _dev(idx), feat_dtype)
    assert torch.equal(gf, again)


def _iic_inputs(B, K1, D, N, feat_dtype, bank_dtype, with_neg, g):
    """l, ab [B, D]; bank_l, bank_ab (strided), bank_neg (or None) [N, D]; idx [B, K1] on the CPU."""
    l = torch.randn(B, D, generator=g, dtype=torch.float64).to(feat_dtype)
    ab = torch.randn(B, D, generator=g, dtype=torch.float64).to(feat_dtype)
    bl, bab = _bank(N, D, bank_dtype, seed=1), _bank(N, D, bank_dtype, strided=True, seed=2)
    bneg = _bank(N, D, bank_dtype, seed=3) if with_neg else None
    return l, ab, bl, bab, bneg, torch.randint(0, N, (B, K1), generator=g)


@nce
@pytest.mark.parametrize("feat_dtype,bank_dtype", NCE_DTYPES)
@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("B,K1,D,N", [(0, 3, 8, 10), (4, 1, 128, 50), (3, 17, 33, 40), (6, 2049, 128, 3000)])
def test_iic_scores_cuda_matches_cpu(feat_dtype, bank_dtype, with_neg, B, K1, D, N):
    g = torch.Generator().manual_seed(2)
    l, ab, bl, bab, bneg, idx = _iic_inputs(B, K1, D, N, feat_dtype, bank_dtype, with_neg, g)
    inv_t = 1 / 0.07
    got = torch.ops.iic_ext.iic_scores(_dev(l), _dev(ab), _dev(bl), _dev(bab), _dev(bneg), _dev(idx), inv_t)
    want = torch.ops.iic_ext.iic_scores(l, ab, bl, bab, bneg, idx, inv_t)
    tol = _nce_tol(feat_dtype, bank_dtype)
    tol = dict(rtol=tol["rtol"], atol=tol["atol"] * inv_t)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == feat_dtype and a.shape == b.shape == (B, (2 if with_neg else 1) * K1)
        torch.testing.assert_close(a.cpu(), b, **tol)
    gl = torch.randn(B, got[0].shape[1], generator=g, dtype=torch.float64).to(feat_dtype)
    gab = torch.randn(B, got[0].shape[1], generator=g, dtype=torch.float64).to(feat_dtype)
    args = (bl, bab, bneg, idx, inv_t, feat_dtype)
    cuda_args = (_dev(bl), _dev(bab), _dev(bneg), _dev(idx), inv_t, feat_dtype)
    dg = torch.ops.iic_ext._iic_scores_backward(_dev(gl), _dev(gab), *cuda_args)
    dw = torch.ops.iic_ext._iic_scores_backward(gl, gab, *args)
    scale = max(1.0, K1 ** 0.5)
    for a, b in zip(dg, dw):
        assert a.dtype == feat_dtype and a.shape == (B, D)
        torch.testing.assert_close(a.cpu(), b, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)
    again = torch.ops.iic_ext._iic_scores_backward(_dev(gl), _dev(gab), *cuda_args)
    assert all(torch.equal(a, b) for a, b in zip(dg, again))


@nce
@pytest.mark.parametrize("feat_dtype,bank_dtype", NCE_DTYPES)
@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("B,K1,D,N", [(0, 3, 8, 10), (4, 1, 128, 50), (3, 17, 33, 40), (6, 2049, 128, 3000),
                                      (2, 700, 0, 30)])
def test_iic_softmax_loss_cuda_matches_cpu(feat_dtype, bank_dtype, with_neg, B, K1, D, N):
    """The CUDA loss kernel (scores, softmax, backward) against the CPU one-pass kernel and against the
    composite of the scores ops on the GPU; loss and gradient, repeatable to the bit."""
    g = torch.Generator().manual_seed(6)
    l, ab, bl, bab, bneg, idx = _iic_inputs(B, K1, D, N, feat_dtype, bank_dtype, with_neg, g)
    inv_t = 1 / 0.07
    cuda_args = (_dev(l), _dev(ab), _dev(bl), _dev(bab), _dev(bneg), _dev(idx), inv_t)
    got = torch.ops.iic_ext.iic_softmax_loss(*cuda_args)
    want = torch.ops.iic_ext.iic_softmax_loss(l, ab, bl, bab, bneg, idx, inv_t)
    composite = torch.ops.iic_ext._iic_softmax_loss_unfused(*cuda_args)
    tol = _nce_tol(feat_dtype, bank_dtype)
    scale = max(1.0, K1 ** 0.5) * inv_t
    tol = dict(rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)
    acc = torch.float64 if torch.float64 in (feat_dtype, bank_dtype) else torch.float32
    for a, b, c, shape in zip(got, want, composite, [(B,), (B,), (B, D), (B, D)]):
        assert a.dtype == b.dtype == c.dtype == acc and a.shape == b.shape == shape
        torch.testing.assert_close(a.cpu(), b, **tol)
        torch.testing.assert_close(a, c, **tol)
    again = torch.ops.iic_ext.iic_softmax_loss(*cuda_args)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def _dominant_positive_case(B=4, K1=300, D=16, N=2000, logit=400.0, seed=8):
    """Float64 inputs whose logits have the positive at ``logit`` and the other columns 5 to 20 below it,
    as a trained model's un-normalised features give at T = 0.07: softmax - 1 at column 0 is a small
    difference of numbers near 1 there."""
    g = torch.Generator().manual_seed(seed)
    inv_t = 1 / 0.07
    idx = torch.randperm(N, generator=g)[: B * K1].view(B, K1)
    banks = []
    for v in range(3):
        lo, hi = math.acos(1 - 5 / logit), math.acos(1 - 20 / logit)
        theta = lo + (hi - lo) * torch.rand(N, generator=g, dtype=torch.float64)
        bank = torch.zeros(N, D, dtype=torch.float64)
        bank[:, 0], bank[:, 1] = theta.cos(), theta.sin()
        if v < 2:  # the two views' banks hold the positive's direction; the intra-negative bank does not
            bank[idx[:, 0]] = 0
            bank[idx[:, 0], 0] = 1
        banks.append(bank)
    l = torch.zeros(B, D, dtype=torch.float64)
    l[:, 0] = logit / inv_t
    return l, l.clone(), banks, idx, inv_t


@nce
def test_iic_softmax_loss_cuda_dominant_positive():
    """float32 loss gradient to a few units of rounding of the result when the positive dominates: the
    softmax must be taken as (x - max) - log(sum), not x - (max + log(sum)), whose rounding at the
    logits' magnitude (400 here) would show up in softmax - 1 at column 0."""
    l, ab, banks, idx, inv_t = _dominant_positive_case()
    l64, ab64 = l.clone().requires_grad_(), ab.clone().requires_grad_()
    want = reference.iic_softmax_loss(l64, ab64, *banks, idx, inv_t)
    want_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), (l64, ab64))
    got = torch.ops.iic_ext.iic_softmax_loss(l.float().to(CUDA), ab.float().to(CUDA),
                                             *[b.float().to(CUDA) for b in banks], idx.to(CUDA), inv_t)
    for a, b in zip(got[:2], want):
        torch.testing.assert_close(a.cpu(), b.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2:], want_grads):
        torch.testing.assert_close(a.cpu(), b.float(), rtol=1e-3, atol=2e-5)


@nce
def test_iic_softmax_loss_cuda_autograd_and_opcheck():
    g = torch.Generator().manual_seed(7)
    B, K1, D, N = 5, 300, 24, 90
    l = torch.randn(B, D, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    ab = torch.randn(B, D, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    banks = [_bank(N, D, torch.float64, seed=s).to(CUDA) for s in (1, 2, 3)]
    idx = torch.randint(0, N, (B, K1), generator=g).to(CUDA)
    loss_l, loss_ab = ops.iic_softmax_loss(l, ab, *banks, idx, 2.0)
    w = torch.randn(B, generator=g, dtype=torch.float64).to(CUDA)
    gl, gab = torch.autograd.grad((loss_l * w).sum() + loss_ab.sum(), (l, ab))
    rl, rab = reference.iic_softmax_loss(l, ab, *banks, idx, 2.0)
    wl, wab = torch.autograd.grad((rl * w).sum() + rab.sum(), (l, ab))
    torch.testing.assert_close(loss_l, rl)
    torch.testing.assert_close(loss_ab, rab)
    torch.testing.assert_close(gl, wl)
    torch.testing.assert_close(gab, wab)
    args = (l.detach(), ab.detach(), *banks, idx, 2.0)
    torch.library.opcheck(torch.ops.iic_ext.iic_softmax_loss.default, args)
    torch.library.opcheck(torch.ops.iic_ext._iic_scores_backward.default,
                          (torch.randn(B, 2 * K1, dtype=torch.float64, device=CUDA),) * 2 + (*banks, idx, 2.0, torch.float64))


@nce
@pytest.mark.parametrize("feat_dtype,bank_dtype", NCE_DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_bank_update_cuda_matches_cpu_with_duplicates(feat_dtype, bank_dtype, strided):
    N, D = 50, 128
    g = torch.Generator().manual_seed(3)
    bank = _bank(N, D, bank_dtype, strided)
    feat = torch.randn(40, D, generator=g, dtype=torch.float64).to(feat_dtype)
    idx = torch.randint(0, 12, (40,), generator=g)  # many repeats: the last occurrence must win
    bc = _dev(bank)
    torch.ops.iic_ext.bank_update_(bc, _dev(idx), _dev(feat), 0.5)
    torch.ops.iic_ext.bank_update_(bank, idx, feat, 0.5)
    torch.testing.assert_close(bc.cpu(), bank, **_nce_tol(feat_dtype, bank_dtype))
    if hasattr(reference, "bank_update_"):
        ref = _bank(N, D, bank_dtype, strided)
        reference.bank_update_(ref, idx, feat, 0.5)
        torch.testing.assert_close(bc.cpu(), ref, **_nce_tol(feat_dtype, bank_dtype))
    # deterministic: repeating the update from the same state gives the same bits
    b1, b2 = _dev(_bank(N, D, bank_dtype, strided)), _dev(_bank(N, D, bank_dtype, strided))
    for b in (b1, b2):
        torch.ops.iic_ext.bank_update_(b, _dev(idx), _dev(feat), 0.5)
    assert torch.equal(b1, b2)


@nce
def test_bank_update_reads_rows_before_writing_and_skips_empty():
    bank = torch.nn.functional.normalize(torch.randn(8, 32, dtype=torch.float64), dim=1).to(CUDA)
    before = bank.clone()
    feat = torch.randn(3, 32, dtype=torch.float64, device=CUDA)
    idx = torch.tensor([5, 2, 5], device=CUDA)
    torch.ops.iic_ext.bank_update_(bank, idx, feat, 0.25)
    want = before.clone()
    for b in (1, 2):  # row 5 from the last occurrence, computed from the old row
        v = 0.25 * before[idx[b]] + 0.75 * feat[b]
        want[idx[b]] = v / v.norm()
    torch.testing.assert_close(bank, want)
    torch.ops.iic_ext.bank_update_(bank, idx[:0], feat[:0], 0.5)
    torch.testing.assert_close(bank, want)


@nce
def test_nce_bad_inputs_raise_on_cuda():
    feat = torch.randn(3, 16, device=CUDA)
    bank = torch.randn(10, 16, device=CUDA)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.iic_ext.bank_scores(feat, bank, torch.full((3, 2), 10, device=CUDA))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.iic_ext.bank_scores(feat, bank, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.iic_ext.bank_update_(bank, torch.zeros(3, dtype=torch.long), feat, 0.5)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.iic_ext.bank_update_(bank, torch.full((3,), 10, device=CUDA), feat, 0.5)
    with pytest.raises(RuntimeError, match="negative entry"):
        torch.ops.iic_ext.iic_scores(feat, feat, bank, bank, None, torch.full((3, 2), -1, device=CUDA), 1.0)
    torch.cuda.synchronize()


@nce
def test_nce_gradcheck_cuda():
    nce_ops = pytest.importorskip("iic_ext.ops.nce")  # registers the autograd formulas
    del nce_ops
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(3, 12, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    bank = _bank(20, 12, torch.float64).to(CUDA)
    idx = torch.randint(0, 20, (3, 5), generator=g).to(CUDA)
    assert torch.autograd.gradcheck(lambda f: torch.ops.iic_ext.bank_scores(f, bank, idx), (feat,))
    ab = torch.randn(3, 12, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    bneg = _bank(20, 12, torch.float64, seed=5).to(CUDA)
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.iic_ext.iic_scores(a, b, bank, bank * 0.5, bneg, idx, 2.0), (feat, ab)
    )
