"""The loss path and the trainer on CUDA against the same computation on the CPU (runs only with a GPU).

``iic_softmax_loss`` has a fused kernel on the CPU only; on CUDA it is ``iic_scores`` followed by
``cross_entropy``. Both must give the same losses, gradients and bank updates, and a training run on
CUDA must follow the CPU run from the same seed.
"""
import math

import pytest
import torch

from conftest import TINY_TRAIN
from iic_ext import ops
from iic_ext import train as T
from iic_ext.nce import NCEAverage
from iic_ext.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"


def _features(B, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=torch.float64).mul_(3).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("B,K1,D,N", [(1, 1, 8, 4), (4, 65, 33, 50), (8, 1025, 128, 3000)])
def test_softmax_loss_cuda_matches_cpu_kernel(feat_dtype, with_neg, B, K1, D, N):
    g = torch.Generator().manual_seed(5)
    bank_dtype = torch.float64 if feat_dtype == torch.float64 else torch.float32
    banks = [torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(bank_dtype)
             for _ in range(3)]
    if not with_neg:
        banks[2] = None
    l, ab, _ = _features(B, D, feat_dtype, seed=6)
    idx = torch.randint(0, N, (B, K1), generator=g)
    inv_t = 1 / 0.07
    cpu_in = [t.clone().requires_grad_() for t in (l, ab)]
    cuda_in = [t.to(CUDA).requires_grad_() for t in (l, ab)]
    want = ops.iic_softmax_loss(*cpu_in, *banks, idx, inv_t)
    got = ops.iic_softmax_loss(*cuda_in, *[None if b is None else b.to(CUDA) for b in banks], idx.to(CUDA), inv_t)
    ref = reference.iic_softmax_loss(l.double(), ab.double(), *[None if b is None else b.double() for b in banks],
                                     idx, inv_t)
    rtol, atol = (2e-2, 2e-2) if feat_dtype == torch.bfloat16 else (1e-4, 1e-4)
    if feat_dtype == torch.float64:
        rtol, atol = 1e-10, 1e-10
    for a, b, r in zip(got, want, ref):
        assert a.device.type == CUDA and a.dtype == b.dtype and a.shape == (B,)
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=atol)
        torch.testing.assert_close(a.cpu().double(), r, rtol=rtol, atol=atol)
    w = torch.rand(B, generator=g, dtype=torch.float64)
    for out, inputs in ((got, cuda_in), (want, cpu_in)):
        ((out[0] * w.to(out[0])).sum() + 2 * (out[1] * w.to(out[1])).sum()).backward()
    for a, b in zip(cuda_in, cpu_in):
        assert a.grad.dtype == feat_dtype
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=rtol, atol=atol * inv_t)


@pytest.mark.parametrize("intra_neg", [True, False])
def test_nce_average_softmax_losses_cuda_follow_cpu(intra_neg):
    """Three steps of ``softmax_losses`` + backward + SGD on both devices, same idx: losses, feature
    gradients and all three banks agree."""
    B, D, N, K = 6, 64, 40, 31
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)]
    mods = [NCEAverage(D, N, nce_k=K, intra_neg=intra_neg, generator=gens[0]),
            NCEAverage(D, N, nce_k=K, intra_neg=intra_neg, generator=gens[1]).to(CUDA)]
    mods[1].load_state_dict(mods[0].state_dict())
    g = torch.Generator().manual_seed(12)
    W = torch.randn(D, D, generator=g) / 8
    weights = [W.clone().requires_grad_(), W.to(CUDA).requires_grad_()]
    for step in range(3):
        x = torch.randn(3, B, D, generator=g)
        y = torch.randperm(N, generator=g)[:B]
        results = []
        for mod, w, dev in zip(mods, weights, ("cpu", CUDA)):
            l, ab, neg = (x.to(dev) @ w).unbind(0)
            args = (l, ab, neg.detach(), y.to(dev)) if intra_neg else (l, ab, y.to(dev))
            loss_l, loss_ab = mod.softmax_losses(*args)
            (loss_l.mean() + loss_ab.mean()).backward()
            results.append((loss_l.detach().cpu(), loss_ab.detach().cpu(), w.grad.cpu()))
            with torch.no_grad():
                w -= 0.5 * w.grad
            w.grad = None
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for name in ("memory_l", "memory_ab") + (("memory_neg",) if intra_neg else ()):
            torch.testing.assert_close(getattr(mods[1], name).cpu(), getattr(mods[0], name), rtol=1e-5, atol=1e-5)


TINY = TINY_TRAIN + ["--epochs", "2"]


def _run(tmp_path, name, extra):
    args = T.resolve_args(T.get_args_parser().parse_args(TINY + extra + ["--out", str(tmp_path / name)]))
    return T.main(args)


@pytest.mark.parametrize("extra", [["--neg", "repeat", "--modality", "res"],
                                   ["--neg", "shuffle", "--modality", "rgb", "--nce-criterion"]])
def test_training_on_cuda_follows_cpu(tmp_path, monkeypatch, extra):
    """The same seed on both devices: the same data, idx and negatives, so the step losses agree
    (TF32 off, so the convolutions round as float32 on both)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = _run(tmp_path, "cpu", extra + ["--device", "cpu"])
    gpu = _run(tmp_path, "cuda", extra + ["--device", "cuda"])
    a = [s for e in cpu["history"] for s in e["step_losses"]]
    b = [s for e in gpu["history"] for s in e["step_losses"]]
    assert len(a) == len(b) == 4 and all(math.isfinite(v) for v in b)
    # one step is exact to rounding; later steps inherit the first step's rounding, amplified
    assert b[0] == pytest.approx(a[0], rel=1e-4)
    assert b == pytest.approx(a, rel=1e-2)
    ck = torch.load(gpu["last"], map_location="cpu", weights_only=False)
    assert ck["epoch"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_training_on_cuda_with_amp(tmp_path, amp_dtype):
    res = _run(tmp_path, amp_dtype, ["--device", "cuda", "--amp", "--amp-dtype", amp_dtype])
    losses = [s for e in res["history"] for s in e["step_losses"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    ck = torch.load(res["last"], map_location="cpu", weights_only=False)
    assert (ck.get("scaler") is not None) == (amp_dtype == "fp16")


def test_softmax_loss_opcheck_cuda():
    g = torch.Generator().manual_seed(8)
    banks = [torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1).to(CUDA) for _ in range(3)]
    for neg in (banks[2], None):
        l, ab, _ = [t.to(CUDA).requires_grad_() for t in _features(4, 16, torch.float32, seed=9)]
        idx = torch.randint(0, 30, (4, 7), generator=g).to(CUDA)
        torch.library.opcheck(torch.ops.iic_ext.iic_softmax_loss.default, (l, ab, banks[0], banks[1], neg, idx, 2.0))


def _index_ops(B=4, D=16, N=30, T=6):
    """Every op with an index argument, on valid CUDA inputs."""
    g = torch.Generator().manual_seed(10)
    clip = torch.randint(0, 256, (B, 3, T, 8, 8), dtype=torch.uint8, generator=g).to(CUDA)
    time_index = torch.randint(0, T, (B, T), generator=g).to(CUDA)
    banks = [torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(CUDA) for _ in range(3)]
    l, ab, neg = [t.to(CUDA) for t in _features(B, D, torch.float32, seed=11)]
    l.requires_grad_()
    idx = torch.randint(0, N, (B, 9), generator=g).to(CUDA)
    y = idx[:, 0].contiguous()
    return {
        "temporal_gather": lambda: ops.temporal_gather(clip.float(), time_index),
        "iic_views": lambda: ops.iic_views(clip, time_index),
        "bank_scores": lambda: ops.bank_scores(l, banks[0], idx).sum().backward(),
        "iic_scores": lambda: sum(o.sum() for o in ops.iic_scores(l, ab, *banks, idx, 2.0)).backward(),
        "iic_softmax_loss": lambda: sum(o.sum() for o in ops.iic_softmax_loss(l, ab, *banks, idx, 2.0)).backward(),
        "bank_update_": lambda: ops.bank_update_(banks[2], y, neg, 0.5),
    }


@pytest.mark.parametrize("name", ["temporal_gather", "iic_views", "bank_scores", "iic_scores", "iic_softmax_loss",
                                  "bank_update_"])
def test_unchecked_indices_do_not_synchronise(name):
    """By default the range check of an index argument reads its result on the host (a device
    synchronisation); inside unchecked_indices the same call queues without waiting."""
    fn = _index_ops()[name]
    fn()  # warm up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            fn()
        with ops.unchecked_indices():
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
