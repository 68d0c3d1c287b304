"""Group ``step``: one whole IIC training step on the fused ops against the same step on the reference.

The step mirrors the original ``train_ssl.py`` loop (R3D-10, ``--modality res --neg repeat``,
softmax NCE with K = 1024, T = 0.07, m = 0.5, 512-d features, UCF101's N = 9537, SGD lr 0.01,
momentum 0.9, weight decay 1e-4):

1. views of the uint8 clip batch: RGB, residual, repeat negative (``iic_views``);
2. three forward passes through the backbone in train mode, the negative under ``no_grad``;
3. the softmax loss (label 0) of both views' logits against K + 1 sampled rows of the three banks
   (fused arm: ``iic_softmax_loss``, as the trainer; reference arm: ``index_select`` + ``bmm`` +
   ``cross_entropy``, as the original), backward, SGD step;
4. the momentum update of the three banks (``bank_update_``).

The two arms run the same model (same initial weights, each its own copy and optimiser) and differ only
in the op functions: ``iic_ext.ops`` or ``iic_ext.ops.reference``. The share of the step taken by the
ops is measured by timing them alone on the same inputs.
"""
import copy
from typing import List

import torch
import torch.nn.functional as F

from iic_ext import ops
from iic_ext.ops import indices, reference

from . import bench_nce
from .harness import Config, as_trained, compare, time_arms

N, K, D = 9537, 1024, 512
TEMPERATURE, MOMENTUM = bench_nce.TEMPERATURE, bench_nce.MOMENTUM


class IICStep:
    """State and ops of one arm: a backbone, its SGD optimiser, three banks and the op functions."""

    def __init__(self, model, banks, views, losses, update, device):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.banks = banks
        self.views, self.losses, self.update = views, losses, update
        self.device = device

    def __call__(self, clip, y, time_index, idx):
        rgb, res, neg = self.views(clip, time_index)
        feat_l = self.model(rgb)
        feat_ab = self.model(res)
        with torch.no_grad():  # the negative's feature only feeds its bank
            feat_neg = self.model(neg)
        bank_l, bank_ab, bank_neg = self.banks
        loss_l, loss_ab = self.losses(feat_l, feat_ab, bank_l, bank_ab, bank_neg, idx, 1.0 / TEMPERATURE)
        loss = loss_l.mean() + loss_ab.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.update(bank_l, y, feat_l.detach(), MOMENTUM)
            self.update(bank_ab, y, feat_ab.detach(), MOMENTUM)
            self.update(bank_neg, y, feat_neg, MOMENTUM)
        return loss.detach()


def _banks(device, g):
    stdv = 1.0 / (D / 3) ** 0.5
    return [torch.rand(N, D, generator=g).mul_(2 * stdv).add_(-stdv).to(device) for _ in range(3)]


def _nce_only(losses, update, banks, B, device, g, idx, y):
    l = F.relu(torch.randn(B, D, generator=g)).to(device).requires_grad_()
    ab = F.relu(torch.randn(B, D, generator=g)).to(device).requires_grad_()
    neg = F.relu(torch.randn(B, D, generator=g)).to(device)
    return bench_nce._make_step(losses, update, l, ab, neg, banks, idx, y)


def run(cfg: Config):
    if not hasattr(ops, "iic_softmax_loss"):
        raise ImportError("the NCE ops (iic_ext.ops.iic_softmax_loss) are not in this checkout")
    from iic_ext.models import build_model

    if cfg.quick:
        shapes = [(8, 3, 16, 32, 32)]
    else:
        shapes = [(8, 3, 16, 112, 112), (16, 3, 16, 112, 112)]
    rows: List[dict] = []
    notes = []
    if cfg.quick:
        notes.append("step: --quick uses a 16×32×32 clip (the full run: 16×112×112, batch 8 and 16) and "
                     "does not measure its memory")
    for shape in shapes:
        B, C, T, H, W = shape
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model("r3d").to(cfg.device).train()
        banks = _banks(cfg.device, g)
        clip = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(cfg.device)
        y = torch.randperm(N, generator=g)[:B].to(cfg.device)
        idx = torch.randint(0, N, (B, K + 1), generator=g).to(cfg.device)
        idx[:, 0] = y
        time_index = indices.repeat_index(B, T, g).to(cfg.device)
        steps = {
            "fused": IICStep(copy.deepcopy(model), [b.clone() for b in banks], ops.iic_views, ops.iic_softmax_loss,
                             ops.bank_update_, cfg.device),
            "original": IICStep(copy.deepcopy(model), [b.clone() for b in banks], reference.iic_views,
                                reference.iic_softmax_loss, reference.bank_update_, cfg.device),
        }
        arms = {k: (lambda s=s: s(clip, y, time_index, idx)) for k, s in steps.items()}
        saved = (cfg.repeats, cfg.block_s)
        cfg.repeats, cfg.block_s = (2 if cfg.quick else 3), 0.0  # one step per block
        try:
            step_rows = compare(cfg, "step", "IIC step (R3D-10)", shape, torch.uint8, arms,
                                measure_memory=not cfg.quick, variant=f"batch {B}, {T}×{H}×{W}")
        finally:
            cfg.repeats, cfg.block_s = saved

        # the ops alone, on the same inputs, for their share of the step
        op_arms = {
            "views fused": as_trained(cfg, lambda: ops.iic_views(clip, time_index)),
            "views original": lambda: reference.iic_views(clip, time_index),
            "nce fused": as_trained(cfg, _nce_only(ops.iic_softmax_loss, ops.bank_update_, [b.clone() for b in banks], B,
                                                   cfg.device, g, idx, y)),
            "nce original": _nce_only(reference.iic_softmax_loss, reference.bank_update_, [b.clone() for b in banks], B,
                                      cfg.device, g, idx, y),
        }
        op_stats = time_arms(cfg, op_arms)
        for r in step_rows:
            if r["fused_ms"] is None or r["reference_ms"] is None:
                continue
            op_ms = {k: v.median_ms for k, v in op_stats.items()}
            r["op_ms"] = op_ms
            r["op_share"] = {
                "fused": {op: op_ms[f"{op} fused"] / r["fused_ms"] for op in ("views", "nce")},
                "original": {op: op_ms[f"{op} original"] / r["reference_ms"] for op in ("views", "nce")},
            }
            s = r["op_share"]
            notes.append(
                f"step batch {B} {T}×{H}×{W}: fused step {r['fused_ms']:.0f} ms (views {op_ms['views fused']:.3g} ms = "
                f"{100 * s['fused']['views']:.1f}%, nce {op_ms['nce fused']:.3g} ms = {100 * s['fused']['nce']:.1f}%); "
                f"reference step {r['reference_ms']:.0f} ms (views {op_ms['views original']:.3g} ms = "
                f"{100 * s['original']['views']:.1f}%, nce {op_ms['nce original']:.3g} ms = "
                f"{100 * s['original']['nce']:.1f}%)"
            )
            cfg.log("  " + notes[-1])
        rows += step_rows
        del steps, arms, model
    return rows, notes
