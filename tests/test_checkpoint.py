"""Atomic checkpoint files, clear errors on bad files, RNG state capture and restore."""
import os
import random

import numpy as np
import pytest
import torch

from iic_ext.utils import checkpoint as ckpt_mod
from iic_ext.utils.checkpoint import TMP_PREFIX, CheckpointError, load_checkpoint, save_checkpoint
from iic_ext.utils.misc import EpochSampler, capture_rng_state, restore_rng_state


def _state(v):
    return {"model": {"w": torch.full((64, 64), float(v))}, "epoch": v, "args": {"lr": 0.1, "milestones": [1, 2]}}


def test_roundtrip_weights_only(tmp_path):
    path = save_checkpoint(_state(3), tmp_path / "sub" / "last.pth")
    st = load_checkpoint(path, required=("model", "epoch"))
    assert st["epoch"] == 3 and torch.equal(st["model"]["w"], torch.full((64, 64), 3.0))
    assert os.listdir(tmp_path / "sub") == ["last.pth"]


def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)  # write everything, then cut the file in half and fail
        f.flush()
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["last.pth"]  # and no temporary file is left behind


def test_killed_process_leaves_only_a_hidden_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)

    def killed(*a, **kw):  # what a SIGKILL between write and rename leaves: the temp file stays
        raise SystemExit  # BaseException, like an interrupt

    monkeypatch.setattr(ckpt_mod.os, "replace", killed)
    monkeypatch.setattr(ckpt_mod.os, "unlink", lambda p: None)  # a killed process cleans nothing
    with pytest.raises(SystemExit):
        save_checkpoint(_state(2), path)
    names = sorted(os.listdir(tmp_path))
    assert names[-1] == "last.pth" and len(names) == 2
    assert names[0].startswith(TMP_PREFIX) and not names[0].endswith(".pth")
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage", "not_a_dict"])
def test_bad_files_raise_naming_the_file(tmp_path, damage):
    path = tmp_path / "ckpt_epoch5.pth"
    if damage != "missing":
        save_checkpoint(_state(5), path)
        data = path.read_bytes()
        if damage == "empty":
            path.write_bytes(b"")
        elif damage == "truncated":
            path.write_bytes(data[: len(data) // 3])
        elif damage == "garbage":
            path.write_bytes(b"\x00not a checkpoint" * 10)
        else:
            torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_entries(tmp_path):
    path = save_checkpoint({"model": {}}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(path, required=("model", "optimizer"))


def test_rng_state_roundtrip_through_a_file(tmp_path):
    g1 = torch.Generator().manual_seed(1)
    g2 = torch.Generator().manual_seed(2)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    torch.rand(3, generator=g1)
    state = capture_rng_state(negative=g1, nce=g2)
    save_checkpoint({"rng": state}, tmp_path / "r.pth")

    def draw():
        return (random.random(), float(np.random.rand()), torch.rand(2).tolist(),
                torch.rand(2, generator=g1).tolist(), torch.randint(0, 100, (3,), generator=g2).tolist())

    expected = draw()
    draw()  # move every stream on
    restore_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"], negative=g1, nce=g2)
    assert draw() == expected
    with pytest.raises(KeyError, match="other"):
        restore_rng_state(state, other=torch.Generator())


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(4)
    torch.manual_seed(0)
    first = list(a)
    b.set_epoch(4)
    torch.manual_seed(1)
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(5)
    assert list(b) != first
