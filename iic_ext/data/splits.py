"""Readers for the UCF101 and HMDB51 split files.

Three formats are understood:

* list format (official UCF101 ``ucfTrainTestlist/`` and the original repository's ``split/``):
  ``classInd.txt`` (``<1-based id> <class>``), ``trainlist0N.txt`` (``<class>/<video>.avi [id]``),
  ``testlist0N.txt`` (``<class>/<video>.avi``); CRLF or LF line endings, final newline optional;
* official HMDB51 ``testTrainMulti_7030_splits/``: ``<class>_test_splitN.txt`` with lines
  ``<video>.avi <tag>``, tag 1 = train, 2 = test, 0 = unused; classes are numbered in sorted order.

Labels are 0-based and always taken from the class folder of each entry (as the original code does);
a label column that disagrees with the class folder is an error.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from .errors import MissingDataError, SplitError

__all__ = ["Split", "read_class_index", "read_list_split", "read_hmdb_official_split", "find_split_dir",
           "read_split"]


@dataclass(frozen=True)
class Split:
    """Videos of one split: ``videos[i]`` is ``"<class>/<video>.avi"`` with label ``labels[i]``."""
    classes: tuple[str, ...]
    videos: tuple[str, ...]
    labels: tuple[int, ...]
    source: str

    def __len__(self) -> int:
        return len(self.videos)


def _lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise MissingDataError(path, "split file not found")
    with open(path, "r", encoding="utf-8", newline=None) as f:
        return [line.strip() for line in f if line.strip()]


def read_class_index(path: str) -> tuple[str, ...]:
    """Read ``classInd.txt``; returns class names ordered by their (1-based, contiguous) ids."""
    names: dict[int, str] = {}
    for n, line in enumerate(_lines(path), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SplitError(path, f"line {n}: expected '<id> <class>', got {line!r}")
        names[int(parts[0])] = parts[1]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise SplitError(path, "class ids are not 1..N")
    return tuple(names[i] for i in range(1, len(names) + 1))


def read_list_split(split_dir: str, split: int = 1, train: bool = True) -> Split:
    """Read ``classInd.txt`` and ``trainlist0N.txt`` / ``testlist0N.txt`` from ``split_dir``."""
    classes = read_class_index(os.path.join(split_dir, "classInd.txt"))
    lookup = {c: i for i, c in enumerate(classes)}
    path = os.path.join(split_dir, f"{'trainlist' if train else 'testlist'}{split:02d}.txt")
    videos, labels = [], []
    for n, line in enumerate(_lines(path), 1):
        parts = line.split()
        video = parts[0]
        cls = video.split("/")[0] if "/" in video else None
        if cls not in lookup:
            raise SplitError(path, f"line {n}: class folder of {video!r} is not in classInd.txt")
        label = lookup[cls]
        if len(parts) > 1 and int(parts[1]) - 1 != label:
            raise SplitError(path, f"line {n}: label {parts[1]} disagrees with class {cls!r} ({label + 1})")
        videos.append(video)
        labels.append(label)
    return Split(classes, tuple(videos), tuple(labels), path)


_HMDB_RE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d)\.txt$")


def read_hmdb_official_split(split_dir: str, split: int = 1, train: bool = True) -> Split:
    """Read the official HMDB51 ``<class>_test_splitN.txt`` files (1 = train, 2 = test, 0 = unused)."""
    files = sorted(glob.glob(os.path.join(split_dir, f"*_test_split{split}.txt")))
    if not files:
        raise MissingDataError(os.path.join(split_dir, f"*_test_split{split}.txt"), "no HMDB51 split files")
    classes = tuple(_HMDB_RE.match(os.path.basename(f)).group("cls") for f in files)
    wanted = "1" if train else "2"
    videos, labels = [], []
    for label, (cls, path) in enumerate(zip(classes, files)):
        for n, line in enumerate(_lines(path), 1):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise SplitError(path, f"line {n}: expected '<video> <0|1|2>', got {line!r}")
            if parts[1] == wanted:
                videos.append(f"{cls}/{parts[0]}")
                labels.append(label)
    return Split(classes, tuple(videos), tuple(labels), split_dir)


def _kind(path: str) -> str | None:
    if os.path.isfile(os.path.join(path, "classInd.txt")):
        return "list"
    if glob.glob(os.path.join(path, "*_test_split1.txt")):
        return "hmdb"
    return None


_CANDIDATES = ("split", "splits", "ucfTrainTestlist", "testTrainMulti_7030_splits",
               "UCF101TrainTestSplits-RecognitionTask/ucfTrainTestlist",
               "test_train_splits/testTrainMulti_7030_splits")


def find_split_dir(root: str) -> str:
    """Locate the split folder under a dataset root (the root itself, or a known sub-folder name)."""
    for cand in ("",) + _CANDIDATES:
        path = os.path.join(root, cand) if cand else root
        if os.path.isdir(path) and _kind(path):
            return path
    raise MissingDataError(root, f"no split files found; looked in the root and in {list(_CANDIDATES)} "
                                 f"(pass split_dir=)")


def read_split(split_dir: str, split: int = 1, train: bool = True) -> Split:
    """Read a split in whichever format ``split_dir`` holds."""
    if not 1 <= int(split) <= 3:
        raise ValueError(f"split must be 1, 2 or 3, got {split}")
    kind = _kind(split_dir)
    if kind == "list":
        return read_list_split(split_dir, int(split), train)
    if kind == "hmdb":
        return read_hmdb_official_split(split_dir, int(split), train)
    raise MissingDataError(split_dir, "neither classInd.txt nor *_test_splitN.txt found")
