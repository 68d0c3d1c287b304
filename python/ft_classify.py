"""Command line of the original IIC ``ft_classify.py``, running :func:`iic_ext.finetune.main`.

Accepts the original flags and their ``--flag=value`` style::

    python python/ft_classify.py --ckpt ssl.pth --dataset ucf101 --split 1            # fine-tune + test
    python python/ft_classify.py --ckpt ckpt/r3d_res_cls/best.pth --dataset ucf101 --mode=test

Defaults follow the original (``--dataset ucf101``, ``--modality res``, ``--bs 16``, ``--workers 4``,
``--lr 1e-3``, ``--wd 5e-4``, 150 epochs, seed 632, models under ``--model_dir ./ckpt/``
in ``<model>_<modality>_cls[_<desp>]``); every option of ``python -m iic_ext.finetune`` is accepted as well.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iic_ext.finetune import get_args_parser, main  # noqa: E402


def parse_args(argv=None):
    parser = get_args_parser()
    parser.description = "Finetune 3D CNN from pretrained weights (original command line)"
    parser.add_argument("--model_dir", "--model-dir", dest="model_dir", default="./ckpt/",
                        help="parent folder of the run folder")
    parser.add_argument("--start-epoch", "--start_epoch", dest="start_epoch", type=int, default=1,
                        help="accepted for compatibility; use --resume to continue a run")
    parser.set_defaults(dataset="ucf101", workers=4, modality="res")
    args = parser.parse_args(argv)
    if args.start_epoch != 1:
        parser.error("--start-epoch: continue an interrupted run with --resume <run>/last.pth instead")
    if args.out is None:
        name = f"{args.model or 'r3d'}_{args.modality}_cls" + (f"_{args.desp}" if args.desp else "")
        args.out = os.path.join(args.model_dir, name)
    return args


if __name__ == "__main__":
    args = parse_args()
    print(vars(args))
    main(args)
