"""The benchmark command (``python -m benchmarks``): it runs from the repository root after the README's
install, checks its baselines, and writes the documented files and rows.

Nothing here times anything against a threshold: the runs are the shortest the command offers, and only
what they write is checked.
"""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO
from iic_ext.ops import HAS_C

pytestmark = pytest.mark.skipif(not HAS_C, reason="compiled iic_ext._C not built")

# the keys every row carries (the JSON schema the README documents)
ROW_KEYS = {"group", "name", "shape", "dtype", "device", "threads", "fused_ms", "reference_ms", "reference",
            "ratio", "fused_peak_bytes", "reference_peak_bytes", "floor_ms"}
BASELINES = {"original", "vectorized", "dense", "compiled"}


def test_check_runs_from_the_repository_root():
    # from the root, the source folder iic_ext/ comes first on sys.path: the compiled ops must still load
    got = subprocess.run([sys.executable, "-m", "benchmarks", "--check"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "baselines match the reference" in got.stdout


def test_unknown_group_is_refused(tmp_path):
    got = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "negatives,warp", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert got.returncode == 2
    assert "unknown group(s) ['warp']" in got.stderr
    assert not any(tmp_path.iterdir())


def test_quick_run_writes_rows_table_and_the_commit_measured(tmp_path, monkeypatch):
    from benchmarks import harness, run

    # A stand-in for git that reports the checkout dirty as soon as anything is in the results folder (as
    # when the results are tracked files): the commit recorded must be the one read before the run wrote.
    reads = []

    def commit():
        reads.append(any(tmp_path.iterdir()))
        return "c0ffee" + ("+dirty" if reads[-1] else "")

    monkeypatch.setattr(harness, "git_commit", commit)
    args = run.get_args_parser().parse_args(
        ["--quick", "--only", "negatives,views", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert run.main(args) == 0

    meta = json.loads((tmp_path / "cpu.meta.json").read_text())
    assert meta["commit"] == "c0ffee"
    assert meta["device"] == "cpu" and meta["quick"] is True
    assert meta["bandwidth_gbps"] > 0

    rows = json.loads((tmp_path / "cpu.json").read_text())
    assert {r["group"] for r in rows} == {"negatives", "views"}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["device"] == "cpu" and r["threads"] >= 1
        assert r["reference"] in BASELINES
        assert r["fused_ms"] > 0 and r["reference_ms"] > 0
        assert math.isclose(r["ratio"], r["reference_ms"] / r["fused_ms"], rel_tol=1e-6)
        assert r["floor_ms"] is None or r["floor_ms"] > 0
    # every clip-side op is compared with the original-style and the vectorised baseline
    for name in {r["name"] for r in rows}:
        assert {"original", "vectorized"} <= {r["reference"] for r in rows if r["name"] == name}, name

    table = (tmp_path / "cpu.md").read_text()
    assert "| group | op | shape |" in table
    assert table.count("\n| negatives |") + table.count("\n| views |") == len(rows)
    assert "c0ffee" in table and "c0ffee+dirty" not in table


def test_nce_profile_reports_host_and_kernel_time():
    got = subprocess.run([sys.executable, "-m", "benchmarks.profile_nce", "--device", "cpu", "--shapes", "1",
                          "--steps", "1", "--arms", "fused", "--rows", "5"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout + got.stderr
    lines = [ln for ln in got.stdout.splitlines() if ln.startswith("== ")]
    assert len(lines) == 2 and all("enqueue" in ln and "total" in ln for ln in lines)  # the two rows' fused arms
    assert "iic_ext::iic_scores" in got.stdout and "iic_ext::iic_softmax_loss" in got.stdout


@pytest.mark.slow
def test_step_group_runs_the_trainers_step_for_every_objective(tmp_path):
    """``--only step``: one row per objective (the trainer's own step on the fused ops against the same
    step on the reference ops) and one per backbone asked for, with the rows' schema."""
    from benchmarks import run

    args = run.get_args_parser().parse_args(
        ["--quick", "--only", "step", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path),
         "--models", "r3d,c3d"])
    assert run.main(args) == 0
    rows = json.loads((tmp_path / "cpu.json").read_text())
    assert {(r["objective"], r["model"]) for r in rows} == {("memory", "r3d"), ("moco", "r3d"), ("simclr", "r3d"),
                                                          ("memory", "c3d")}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["group"] == "step" and r["reference"] == "original"
        assert r["fused_ms"] > 0 and r["reference_ms"] > 0
    memory = next(r for r in rows if r["objective"] == "memory" and r["model"] == "r3d")
    assert set(memory["op_share"]["fused"]) == {"views", "nce"}


def test_demo_table_rows_and_the_seed_summary():
    from benchmarks import demo_objectives

    def row(name, seed, t1, r1):
        return {"name": name, "seed": seed, "loss": 9.5, "uniform": 11.09, "top1_contrastive": t1, "chance": 1 / 256,
                "first_top1_contrastive": 0.0, "retrieval": {1: r1, 5: 0.6, 10: 0.7},
                "random_init": {1: 0.2, 5: 0.3, 10: 0.4}, "train_s": 200.0}

    md = demo_objectives.markdown([row("memory (default)", 632, 0.1, 0.4), row("memory (default)", 1, 0.1, 0.3),
                                   row("moco", 632, 0.05, 0.25)])
    assert md.count("\n| memory (default) |") == 2 and md.count("\n| moco |") == 1
    assert "retrieval top-1 35.0 (range 30.0-40.0) against random init 20.0 (20.0-20.0): 1.75x, +15.0 points" in md
