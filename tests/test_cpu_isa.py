"""Every instruction-set variant of the CPU kernels, on one machine.

The kernels' inner loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and the widest one
the processor has is used. ``IIC_EXT_CPU_ISA`` caps that choice, so the narrower variants, which a
machine like this one never picks by itself, run the kernel tests here too (in a subprocess: the choice
is made once per process).
"""
import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from iic_ext.ops import HAS_C

pytestmark = pytest.mark.skipif(not HAS_C, reason="compiled iic_ext._C not built")

ORDER = ["base", "avx2", "avx512"]
KERNEL_TESTS = ["tests/test_nce.py", "tests/test_nce_loss.py", "tests/test_views.py"]


def _run(args, isa):
    env = dict(os.environ, IIC_EXT_CPU_ISA=isa)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _isa_in_subprocess(isa):
    return _run(["-c", "import torch, iic_ext.ops; print(torch.ops.iic_ext._cpu_isa())"], isa)


@functools.lru_cache(maxsize=None)
def _best_isa():
    """What the processor gives when nothing caps it (asked once)."""
    return _isa_in_subprocess("").stdout.strip()


def test_reports_an_instruction_set():
    assert torch.ops.iic_ext._cpu_isa() in ORDER


@pytest.mark.parametrize("isa", ORDER)
def test_cap_takes_effect(isa):
    best = _best_isa()
    got = _isa_in_subprocess(isa)
    assert got.returncode == 0, got.stderr
    # capped, never raised above what the processor has
    assert got.stdout.strip() == ORDER[min(ORDER.index(isa), ORDER.index(best))]


def test_bad_value_names_the_variable():
    got = _isa_in_subprocess("sse9")
    assert got.returncode != 0
    assert "IIC_EXT_CPU_ISA must be avx512, avx2 or base, got 'sse9'" in got.stderr


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_kernel_tests_pass_on_narrower_instruction_sets(isa):
    if ORDER.index(torch.ops.iic_ext._cpu_isa()) <= ORDER.index(isa):
        pytest.skip(f"{isa} is already this machine's instruction set: the main run covers it")
    check = _isa_in_subprocess(isa)
    assert check.stdout.strip() == isa, check.stderr
    args = ["-m", "pytest", *KERNEL_TESTS, "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow and not cuda"]
    got = _run(args, isa)
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-2000:]
