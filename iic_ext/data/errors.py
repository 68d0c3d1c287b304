"""Exceptions for unusable data. Every message names the file or folder and the problem."""
from __future__ import annotations

import os

__all__ = ["DataError", "MissingDataError", "CorruptDataError", "ShortVideoError", "SplitError"]


class DataError(Exception):
    """A video, frame or split file cannot be used.

    Attributes:
        path (str): the offending file or folder.
        problem (str): what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep the two-argument form picklable across DataLoader workers
        return (type(self), (self.path, self.problem))


class MissingDataError(DataError, FileNotFoundError):
    """A video file, frame folder, frame or split file does not exist."""

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class CorruptDataError(DataError):
    """A JPEG or video cannot be decoded."""


class ShortVideoError(DataError):
    """A video has fewer frames than one clip needs."""


class SplitError(DataError):
    """A split or class-index file is malformed or inconsistent."""
