"""IIC self-supervised training with the command line of the original ``train_ssl.py``.

    python python/train_ssl.py --model r3d --modality res --neg repeat --dataset ucf101 --batch_size 16

Every flag of the original is accepted with its default; boolean flags take ``True``/``False`` as
there (``--softmax False`` selects the NCE loss, ``--intra_neg False`` the CMC baseline without the
negative bank). The flags the original parses but never uses (``--lr_decay_epochs``,
``--lr_decay_rate``, ``--beta1``, ``--beta2``, ``--tb_freq``, ``--debug``) are accepted and ignored;
the schedule is the original's MultiStepLR at epochs 45/90/125/160 x 0.2. Checkpoints go to
``<model_path>/<name>/`` and TensorBoard logs to ``<tb_path>/<name>/`` with the original's
``[intraneg_]<model>_<modality>_<mmdd>`` name. Training runs :func:`iic_ext.train.main`, so the
checkpoints (``last.pth`` every epoch, ``ckpt_epoch<N>.pth`` every ``--save_freq``) resume exactly and
keep the scheduler (the original restarted it on resume).

Additions: ``--gpu`` (CUDA device index), ``--cl`` (clip length), ``--data_root``; ``--dataset
synthetic`` with ``--num_videos``, ``--resize``, ``--crop_size`` for a quick run without data.
"""
import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iic_ext import train as iic_train  # noqa: E402


def _bool(value):
    """The original's ``type=ast.literal_eval`` for True/False flags, also accepting lower case."""
    if isinstance(value, bool):
        return value
    text = {"true": "True", "false": "False"}.get(str(value).strip().lower(), value)
    result = ast.literal_eval(text)
    if not isinstance(result, (bool, int)):
        raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
    return bool(result)


def get_args_parser():
    parser = argparse.ArgumentParser("argument for training")
    parser.add_argument("--print_freq", type=int, default=10, help="print frequency")
    parser.add_argument("--tb_freq", type=int, default=500, help="tb frequency (unused, as in the original)")
    parser.add_argument("--save_freq", type=int, default=40, help="save frequency")
    parser.add_argument("--batch_size", type=int, default=16, help="batch_size")
    parser.add_argument("--num_workers", type=int, default=8, help="num of workers to use")
    parser.add_argument("--epochs", type=int, default=240, help="number of training epochs")
    # optimization
    parser.add_argument("--learning_rate", type=float, default=0.01, help="learning rate")
    parser.add_argument("--lr_decay_epochs", type=str, default="120,160,200", help="unused, as in the original")
    parser.add_argument("--lr_decay_rate", type=float, default=0.1, help="unused, as in the original")
    parser.add_argument("--beta1", type=float, default=0.5, help="unused, as in the original")
    parser.add_argument("--beta2", type=float, default=0.999, help="unused, as in the original")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum")
    # resume path
    parser.add_argument("--resume", default="", type=str, metavar="PATH", help="path to latest checkpoint")
    # model definition
    parser.add_argument("--model", type=str, default="r3d", choices=["r3d", "c3d", "r21d", "r3d18"])
    parser.add_argument("--softmax", type=_bool, default=True, help="False: NCE loss")
    parser.add_argument("--nce_k", type=int, default=1024)
    parser.add_argument("--nce_t", type=float, default=0.07)
    parser.add_argument("--nce_m", type=float, default=0.5)
    parser.add_argument("--feat_dim", type=int, default=512, help="dim of feat for inner product")
    # dataset
    parser.add_argument("--dataset", type=str, default="ucf101", choices=["ucf101", "hmdb51", "synthetic"])
    parser.add_argument("--data_root", type=str, default=None, help="default ./data/<dataset>/")
    # specify folder
    parser.add_argument("--model_path", type=str, default="./ckpt/", help="path to save model")
    parser.add_argument("--tb_path", type=str, default="./logs/", help="path to tensorboard")
    # views
    parser.add_argument("--debug", type=_bool, default=False, help="unused, as in the original")
    parser.add_argument("--modality", type=str, default="res", choices=["rgb", "res", "u", "v"])
    parser.add_argument("--intra_neg", type=_bool, default=True, help="False: CMC baseline")
    parser.add_argument("--neg", type=str, default="repeat", choices=["repeat", "shuffle"])
    parser.add_argument("--seed", type=int, default=632)
    # additions
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device index")
    parser.add_argument("--cl", type=int, default=16, help="clip length")
    parser.add_argument("--num_videos", type=int, default=None, help="synthetic only")
    parser.add_argument("--resize", type=int, nargs=2, default=None, help="frame size before the crop")
    parser.add_argument("--crop_size", type=int, default=None, help="crop size")
    parser.add_argument("--amp", type=_bool, default=False, help="mixed precision")
    return parser


def to_train_args(opt):
    """Translate the original options into :mod:`iic_ext.train` arguments (resolved)."""
    name = "{}_{}_{}".format(opt.model, opt.modality, time.strftime("%m%d"))
    if opt.intra_neg:
        name = "intraneg_" + name
    argv = [
        "--dataset", opt.dataset, "--model", opt.model, "--modality", opt.modality,
        "--neg", opt.neg if opt.intra_neg else "none",
        "--epochs", str(opt.epochs), "--batch-size", str(opt.batch_size), "--lr", str(opt.learning_rate),
        "--momentum", str(opt.momentum), "--weight-decay", str(opt.weight_decay),
        "--lr-schedule", "multistep", "--milestones", "45", "90", "125", "160", "--lr-gamma", "0.2",
        "--warmup-epochs", "0", "--no-normalize-features",
        "--nce-k", str(opt.nce_k), "--nce-t", str(opt.nce_t), "--nce-m", str(opt.nce_m),
        "--feat-dim", str(opt.feat_dim), "--clip-len", str(opt.cl), "--workers", str(opt.num_workers),
        "--save-freq", str(opt.save_freq), "--print-freq", str(opt.print_freq), "--seed", str(opt.seed),
        "--out", os.path.join(opt.model_path, name), "--log-dir", os.path.join(opt.tb_path, name),
    ]
    if not opt.softmax:
        argv.append("--nce-criterion")
    if opt.resume:
        argv += ["--resume", opt.resume]
    if opt.data_root:
        argv += ["--data-root", opt.data_root]
    if opt.num_videos is not None:
        argv += ["--num-videos", str(opt.num_videos)]
    if opt.resize is not None:
        argv += ["--resize", *map(str, opt.resize)]
    if opt.crop_size is not None:
        argv += ["--crop-size", str(opt.crop_size)]
    if opt.amp:
        argv.append("--amp")
    if opt.gpu is not None:
        argv += ["--device", "cuda"]
    args = iic_train.get_args_parser().parse_args(argv)
    return iic_train.resolve_args(args)


def main(argv=None):
    opt = get_args_parser().parse_args(argv)
    print("[Warning] using intra-negative" if opt.intra_neg else "[Warning] using baseline")
    if opt.gpu is not None:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--gpu {opt.gpu}: no CUDA device is available")
        torch.cuda.set_device(opt.gpu)
    return iic_train.main(to_train_args(opt))


if __name__ == "__main__":
    main()
