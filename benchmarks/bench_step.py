"""Group ``step``: the trainer's own IIC step (``iic_ext.train.train_step`` with its objective) on the
fused ops against the same step on the reference ops.

The step is the original ``train_ssl.py`` recipe (``--dataset ucf101`` defaults: R3D-10,
``--modality res --neg repeat``, SGD lr 0.01, momentum 0.9, weight decay 1e-4, UCF101's N = 9537) for
each objective at that recipe's settings (memory: K = 1024, T = 0.07, m = 0.5, 512-d features; moco:
16384 keys per queue, MLP head to 128; simclr: MLP head to 128), then the memory objective on every
backbone of the registry:

1. views of the uint8 clip batch: RGB, residual, repeat negative (``iic_views``);
2. the objective's forwards in train mode (memory: three, the negative under ``no_grad``; moco: two
   queries and three keys; simclr: three with gradient);
3. its loss, backward, SGD step, and its after-step update (banks, queues, key encoder).

The ``original`` arm is the same step with every op on :mod:`iic_ext.ops.reference` (``index_select``
+ ``bmm`` NCE, ``torch.roll`` residuals, per-sample gathers), as the original computes them; both arms
start from the same weights and state. The share of the memory step taken by the ops is measured by
timing them alone on the same inputs.
"""
import contextlib
import copy
from typing import List

import torch
import torch.nn.functional as F

from iic_ext import ops, train
from iic_ext.models import MODEL_NAMES, model_spec
from iic_ext.ops import indices, reference

from . import bench_nce
from .harness import Config, as_trained, compare, time_arms

N, K, D = 9537, 1024, 512
TEMPERATURE, MOMENTUM = bench_nce.TEMPERATURE, bench_nce.MOMENTUM


@contextlib.contextmanager
def reference_ops():
    """Every ``iic_ext.ops`` wrapper runs its pure-PyTorch reference inside this block."""
    import iic_ext.ops.nce as nce_mod
    import iic_ext.ops.views as views_mod

    saved = (views_mod.use_compiled, nce_mod.use_compiled)
    views_mod.use_compiled = nce_mod.use_compiled = lambda: False
    try:
        yield
    finally:
        views_mod.use_compiled, nce_mod.use_compiled = saved


def trainer_step(objective: str, model: str, shape, device: str, seed: int = 0):
    """A callable running one ``iic_ext.train.train_step`` of the UCF101 recipe with ``objective`` and
    ``model`` on a fixed uint8 batch of ``shape``, and a second, independent copy of the same state for
    the reference arm. Returns ``(fused, original)``."""
    B, C, T, H, W = shape
    args = train.resolve_args(train.get_args_parser().parse_args(
        ["--dataset", "ucf101", "--objective", objective, "--model", model, "--batch-size", str(B),
         "--clip-len", str(T), "--crop-size", str(H), "--device", device, "--no-progress"]))
    dev = torch.device(device)
    torch.manual_seed(seed)
    c = train.build_components(args, N, dev)
    g = torch.Generator().manual_seed(seed)
    batch = {"rgb": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(dev),
             "index": torch.randperm(N, generator=g)[:B]}
    arms = []
    for copy_state in (False, True):
        parts = copy.deepcopy(c) if copy_state else c
        neg = train._Negatives("repeat", "swap", torch.Generator().manual_seed(seed + 1))

        def step(parts=parts, neg=neg):
            return train.train_step(parts["model"], parts["objective"], parts["optimizer"], batch, args,
                                    negatives=neg, device=dev)["loss"]

        arms.append(step)
    fused, plain = arms

    def original():
        with reference_ops():
            return plain()

    return fused, original


def _banks(device, g):
    stdv = 1.0 / (D / 3) ** 0.5
    return [torch.rand(N, D, generator=g).mul_(2 * stdv).add_(-stdv).to(device) for _ in range(3)]


def _nce_only(losses, update, banks, B, device, g, idx, y):
    l = F.relu(torch.randn(B, D, generator=g)).to(device).requires_grad_()
    ab = F.relu(torch.randn(B, D, generator=g)).to(device).requires_grad_()
    neg = F.relu(torch.randn(B, D, generator=g)).to(device)
    return bench_nce._make_step(losses, update, l, ab, neg, banks, idx, y)


def _step_rows(cfg, name, shape, fused, original, variant, **extra):
    arms = {"fused": fused, "original": original}
    saved = (cfg.repeats, cfg.block_s)
    cfg.repeats, cfg.block_s = (2 if cfg.quick else 3), 0.0  # one step per block
    try:
        return compare(cfg, "step", name, shape, torch.uint8, arms, measure_memory=not cfg.quick,
                       variant=variant, **extra)
    finally:
        cfg.repeats, cfg.block_s = saved


def run(cfg: Config):
    if not hasattr(ops, "iic_softmax_loss"):
        raise ImportError("the NCE ops (iic_ext.ops.iic_softmax_loss) are not in this checkout")

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
        variant = f"batch {B}, {T}×{H}×{W}"
        for objective in ("memory", "moco", "simclr"):
            fused, original = trainer_step(objective, "r3d", shape, cfg.device)
            step_rows = _step_rows(cfg, f"IIC step (R3D-10, {objective})", shape, fused, original, variant,
                                   objective=objective, model="r3d")
            if objective == "memory":
                _op_share(cfg, shape, step_rows, notes)
            rows += step_rows
            del fused, original
    # the memory objective on every backbone, at the smallest shape of the run (or the model's minimum)
    B, C, T, H, W = shapes[0]
    for model in cfg.models or MODEL_NAMES:
        if model not in MODEL_NAMES:
            raise ValueError(f"--models: unknown backbone {model!r}; choose from {MODEL_NAMES}")
        if model == "r3d":
            continue
        t_min, h_min, w_min = model_spec(model).min_clip
        shape = (B, C, max(T, t_min), max(H, h_min), max(W, w_min))
        fused, original = trainer_step("memory", model, shape, cfg.device)
        rows += _step_rows(cfg, f"IIC step ({model}, memory)", shape, fused, original,
                           f"batch {shape[0]}, {shape[2]}×{shape[3]}×{shape[4]}", objective="memory", model=model)
        del fused, original
    return rows, notes


def _op_share(cfg, shape, step_rows, notes):
    """The views and NCE ops timed alone on the step's inputs: their share of the memory step."""
    B, C, T, H, W = shape
    g = torch.Generator().manual_seed(0)
    banks = _banks(cfg.device, g)
    clip = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(cfg.device)
    y = torch.randperm(N, generator=g)[:B].to(cfg.device)
    idx = torch.randint(0, N, (B, K + 1), generator=g).to(cfg.device)
    idx[:, 0] = y
    time_index = indices.repeat_index(B, T, g).to(cfg.device)
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
