"""Command line of the original IIC ``retrieve_clips.py``, running :func:`iic_ext.retrieve.main`.

Accepts the original flags and their ``--flag=True`` / ``--flag=False`` style::

    python python/retrieve_clips.py --ckpt ckpt.pth --dataset ucf101 --merge=True
    python python/retrieve_clips.py --ckpt ckpt.pth --dataset hmdb51 --modality rgb --extract=False

Defaults follow the original (``--dataset ucf101``, ``--modality res``, ``--bs 8``, ``--workers 8``,
features under ``features/<dataset>/<id>``); every option of ``python -m iic_ext.retrieve`` is accepted
as well. Features are cached by settings, so ``--extract`` (default: use the cache when it matches)
only forces a new extraction.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iic_ext.retrieve import get_args_parser, main  # noqa: E402


def parse_args(argv=None):
    parser = get_args_parser()
    parser.description = "Frame Retrieval Experiment (original command line)"
    parser.set_defaults(dataset="ucf101", workers=8, batch_size=8, modality="res", id="r3d")
    args = parser.parse_args(argv)
    if args.feature_dir is None:
        args.feature_dir = os.path.join("features", args.dataset)
    if args.out is None:
        args.out = os.path.join(args.feature_dir, args.id)
    return args


if __name__ == "__main__":
    args = parse_args()
    print(vars(args))
    print("[Warning] The testing modality is {}.".format(args.modality))
    main(args)
