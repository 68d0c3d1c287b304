"""Linear probe and kNN on frozen features: ``python -m iic_ext.linear``.

The backbone is frozen; each video's feature is the average-pooled feature (``--feature pool``, 512-d or
1024-d by model,
default; ``conv`` for the retrieval feature) averaged over its clips, extracted once and cached with
the retrieval features. A multinomial logistic regression (a torch linear layer on z-scored features,
L-BFGS by default) is trained on the training list and tested on the test list; the weight decay is
picked among ``--wd`` values on a seeded 10% of the training list. ``--knn K`` adds a weighted kNN
vote (weights ``exp(cos / t)``) over the same features.

Accepts every data/model option of ``python -m iic_ext.retrieve``. Without arguments: the synthetic
dataset, with the default training run's checkpoint when it exists, else random init.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict

import torch

from .evaluation.common import describe_init, feature_description, select_device
from .evaluation.io import write_json
from .evaluation.probe import accuracy, fit_logistic, select_weight_decay, standardize
from .evaluation.retrieval import knn_classify
from .retrieve import get_args_parser as retrieval_parser
from .retrieve import resolve_args as resolve_retrieval
from .retrieve import video_features

__all__ = ["get_args_parser", "main", "cli"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "IIC linear probe", add_help=add_help, parents=[retrieval_parser(add_help=False)],
        conflict_handler="resolve",
        description="Logistic regression and kNN on frozen video features. Data and model options are "
                    "those of iic_ext.retrieve.")
    g = p.add_argument_group("probe")
    g.add_argument("--wd", "--weight-decay", dest="wd", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
                   help="L2 penalty; several values: chosen on 10%% of the training list")
    g.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "sgd"])
    g.add_argument("--max-iter", "--max_iter", dest="max_iter", type=int, default=300, help="L-BFGS iterations")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    g.add_argument("--epochs", type=int, default=100, help="SGD epochs")
    p.set_defaults(feature="pool", knn=20, plot=False)
    return p


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Returns the dict written to ``<out>/linear.json``."""
    if args.out is None and not getattr(args, "_resolved", False):
        probe_args = argparse.Namespace(**vars(args))
        resolve_retrieval(probe_args)
        args.out = probe_args.out.replace(os.path.join("runs", "retrieve"), os.path.join("runs", "linear"), 1)
    args = resolve_retrieval(args)
    device = select_device(args.device, args.gpu)
    print(f"Linear probe on {args.dataset} split {args.split}: {args.model}, input {args.modality}"
          f"{' + rgb (merged)' if args.merge else ''}, feature {feature_description(args.model, args.feature)}"
          f", {args.clips_per_video} clips/video, device {device}")
    print(f"  {describe_init(args)}")
    t0 = time.time()
    with torch.no_grad():
        feats = video_features(args, device=device)
    tr, te = feats["train"], feats["test"]
    num_classes = int(max(tr["labels"].max(), te["labels"].max())) + 1
    x_tr, x_te = tr["features"].to(device).double(), te["features"].to(device).double()
    y_tr, y_te = tr["labels"].to(device), te["labels"].to(device)
    fit_kw = dict(optimizer=args.optimizer, max_iter=args.max_iter, lr=args.lr, epochs=args.epochs)
    chosen = select_weight_decay(x_tr, y_tr, num_classes, args.wd, seed=args.seed, **fit_kw)
    xs_tr, xs_te = standardize(x_tr, x_te)
    layer = fit_logistic(xs_tr, y_tr, num_classes, weight_decay=chosen["weight_decay"], seed=args.seed, **fit_kw)
    result: Dict[str, Any] = {
        "linear_acc": accuracy(layer, xs_te, y_te), "linear_train_acc": accuracy(layer, xs_tr, y_tr),
        "weight_decay": chosen["weight_decay"], "wd_val_acc": {str(k): v for k, v in chosen["val_acc"].items()},
        "num_train": int(x_tr.shape[0]), "num_test": int(x_te.shape[0]), "feature_dim": int(x_tr.shape[1])}
    if chosen["val_acc"]:
        print("  weight decay on held-out training videos: " +
              ", ".join(f"{k:g}: {100 * v:.1f}%" for k, v in chosen["val_acc"].items()) +
              f" -> {chosen['weight_decay']:g}")
    print(f"  linear probe: test accuracy {100 * result['linear_acc']:.2f}% (train {100 * result['linear_train_acc']:.2f}%)"
          f", {x_tr.shape[0]} training / {x_te.shape[0]} test videos, {num_classes} classes")
    if args.knn:
        with torch.no_grad():
            pred = knn_classify(x_te.float(), x_tr.float(), y_tr, k=args.knn, temperature=args.knn_t,
                                num_classes=num_classes, chunk_size=args.chunk_size)
        k = min(args.knn, x_tr.shape[0])
        result["knn"] = {"k": k, "temperature": args.knn_t, "accuracy": float((pred == y_te).float().mean())}
        print(f"  weighted {k}-NN: test accuracy {100 * result['knn']['accuracy']:.2f}% (t={args.knn_t})")
    result["settings"] = {**{k: v for k, v in vars(args).items() if not k.startswith("_")},
                          "device": str(device), "feature_cache": feats["cache"], "extracted": feats["extracted"],
                          "weights": "random init" if not args.ckpt else args.ckpt_source,
                          "seconds": round(time.time() - t0, 2)}
    path = os.path.join(args.out, "linear.json")
    write_json(result, path)
    print(f"  wrote {path}")
    return result


def cli(argv=None) -> Dict[str, Any]:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
