"""Measurement primitives shared by every benchmark group.

Timing: ``torch.utils.benchmark.Timer`` on the CPU (``num_threads`` stated) and CUDA events on the GPU.
The arms of one comparison are measured interleaved (fused, baseline 1, baseline 2, fused, ...) so that
a change of machine load hits every arm alike; each arm reports the median, min and max of ``repeats``
blocks, a block being enough calls to last ``block_s``.

Memory: the peak of bytes allocated during one call, above what was allocated before it, outputs
included. On CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the
profiler's allocation records (``profile_memory=True``), summed in time order.

Bandwidth floor: a large tensor copy measured in the same run gives the attainable memory bandwidth;
``floor_ms`` is the bytes a one-pass kernel must move divided by it.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.utils.benchmark as tbench


@dataclass
class Config:
    """What a run measures with: the device, threads and how long each measurement lasts."""

    device: str
    threads: int
    quick: bool
    repeats: int = 7
    block_s: float = 0.05
    bandwidth_gbps: float = float("nan")
    device_name: str = ""
    compile_budget: int = 1_000_000  # torch.compile arms still allowed in this run
    warmup: int = 2
    models: tuple = ()  # step group: the backbones of its per-model rows (empty: all)
    log: Callable[[str], None] = print

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


@dataclass
class Stats:
    median_ms: float
    min_ms: float
    max_ms: float
    samples: List[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: List[float]) -> "Stats":
        return cls(statistics.median(samples), min(samples), max(samples), [round(v, 5) for v in samples])


# ---- machine --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


def git_commit() -> Optional[str]:
    """HEAD of the checkout, with ``+dirty`` when tracked files differ from it (then HEAD alone does not
    say what was measured)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.check_output(["git", *a], cwd=root, stderr=subprocess.DEVNULL, text=True)  # noqa: E731
        head = run("rev-parse", "HEAD").strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return None


def metadata(cfg: Config, commit: Optional[str] = None) -> dict:
    """The run's machine, settings and code; ``commit`` as read when the run began (else read now)."""
    meta = {
        "device": cfg.device,
        "device_name": cfg.device_name,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": cfg.threads,
        "quick": cfg.quick,
        "repeats": cfg.repeats,
        "block_s": cfg.block_s,
        "bandwidth_gbps": cfg.bandwidth_gbps,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit if commit is not None else git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if cfg.device == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["gpu_name"] = torch.cuda.get_device_name()
    return meta


# ---- timing ---------------------------------------------------------------------------------------


def _cuda_block_ms(fn: Callable, number: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / number


def _block_ms(cfg: Config, timer: Optional[tbench.Timer], fn: Callable, number: int) -> float:
    if cfg.device == "cuda":
        return _cuda_block_ms(fn, number)
    return timer.timeit(number).mean * 1e3


def time_arms(cfg: Config, arms: Dict[str, Callable], first_call_s: Optional[Dict[str, float]] = None) -> Dict[str, Stats]:
    """Median / min / max milliseconds per call of each arm, blocks interleaved across arms.

    ``first_call_s``: seconds of a call already made (it counts as the first warm-up call).
    """
    timers, numbers = {}, {}
    for name, fn in arms.items():
        timers[name] = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=cfg.threads, label=name)
        done = first_call_s.get(name) if first_call_s else None
        calls = max(cfg.warmup - (1 if done is not None else 0), 0)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        cfg.sync()
        per_call = (time.perf_counter() - t0) / calls if calls else done
        numbers[name] = max(1, int(math.ceil(cfg.block_s / max(per_call, 1e-7))))
    samples: Dict[str, List[float]] = {name: [] for name in arms}
    for _ in range(cfg.repeats):
        for name, fn in arms.items():
            samples[name].append(_block_ms(cfg, timers[name], fn, numbers[name]))
    return {name: Stats.of(s) for name, s in samples.items()}


# ---- memory ---------------------------------------------------------------------------------------


class _quiet_stderr:
    """Silence the profiler library's start/stop lines on fd 2 (Python exceptions still propagate)."""

    def __enter__(self):
        try:
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)


def _cpu_peak_bytes(arms: Dict[str, Callable]) -> Dict[str, int]:
    """One profiler session; each arm runs inside a marked range whose allocations are summed in time
    order. Outputs stay alive until the end of their range, so they count."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, fn in arms.items():
            with record_function(f"iic_bench::{name}"):
                result = fn()
            del result
    events = list(prof.profiler.kineto_results.events())
    ranges = {e.name()[len("iic_bench::"):]: (e.start_ns(), e.end_ns()) for e in events
              if e.name().startswith("iic_bench::")}
    mem = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"))
    peaks = {}
    for name, (t0, t1) in ranges.items():
        cur = peak = 0
        for t, n in mem:
            if t0 <= t <= t1:
                cur += n
                peak = max(peak, cur)
        peaks[name] = int(peak)
    return peaks


def _cuda_peak_bytes(arms: Dict[str, Callable]) -> Dict[str, int]:
    peaks = {}
    for name, fn in arms.items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()  # noqa: F841
        torch.cuda.synchronize()
        peaks[name] = int(torch.cuda.max_memory_allocated() - base)
        del result
    return peaks


def peak_bytes(cfg: Config, arms: Dict[str, Callable]) -> Dict[str, Optional[int]]:
    """Peak bytes allocated by one call of each arm above those allocated before it, outputs included."""
    gc.collect()
    try:
        return _cuda_peak_bytes(arms) if cfg.device == "cuda" else _cpu_peak_bytes(arms)
    except Exception as e:  # pragma: no cover - profiler availability
        cfg.log(f"  (memory measure failed: {e})")
        return {}


# ---- bandwidth ------------------------------------------------------------------------------------


def measure_bandwidth(cfg: Config) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written), with the run's threads."""
    nbytes = (256 if cfg.quick else 1024) * 2**20 if cfg.device == "cuda" else (128 if cfg.quick else 512) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=cfg.device)
    dst = torch.zeros_like(src)
    stats = time_arms(cfg, {"copy": lambda: dst.copy_(src)})["copy"]
    del src, dst
    return 2 * nbytes / (stats.min_ms * 1e-3) / 1e9  # the best block: what the memory system can give


def floor_ms(cfg: Config, nbytes: float) -> float:
    return nbytes / (cfg.bandwidth_gbps * 1e9) * 1e3


# ---- compile --------------------------------------------------------------------------------------


def try_compile(cfg: Config, fn: Callable, call: Callable[[Callable], Callable]):
    """``torch.compile(fn)`` and a warm call; returns (arm, None) or (None, reason)."""
    if cfg.compile_budget <= 0:  # --quick: the compiled arm is left out of the other rows
        return None, None
    cfg.compile_budget -= 1
    try:
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=False)
        arm = call(compiled)
        t0 = time.perf_counter()
        arm()
        cfg.sync()
        cfg.log(f"  compiled in {time.perf_counter() - t0:.1f} s")
        return arm, None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"torch.compile failed: {type(e).__name__}: {msg[:200]}"


# ---- rows -----------------------------------------------------------------------------------------


def target_for(cfg: Config, group: str, reference: str) -> Optional[float]:
    """Target speed-up of the fused arm over a baseline (None where the goals name none)."""
    if reference == "compiled" or group in ("step",):
        return None
    if group == "negatives":
        return {"original": 2.0, "vectorized": 1.0}.get(reference)
    if group == "loader":
        return 3.0 if reference == "original" else None
    if cfg.device == "cuda":
        return 3.0 if reference in ("original", "vectorized", "dense") else None
    return {"original": 5.0, "vectorized": 2.0, "dense": 2.0}.get(reference)


FLOOR_GROUPS = ("residual", "views", "nce")  # within 2x of the bandwidth floor
MEMORY_TARGETS = {("nce", "original"): 10.0}  # peak extra memory: reference / fused


def make_rows(
    cfg: Config,
    group: str,
    name: str,
    shape,
    dtype,
    stats: Dict[str, Stats],
    peaks: Dict[str, Optional[int]],
    floor_bytes: Optional[float],
    references: List[str],
    skipped: Optional[Dict[str, str]] = None,
    fused: str = "fused",
    **extra,
) -> List[dict]:
    """One row per baseline; a baseline that could not run is a row with ``skip_reason``."""
    rows = []
    skipped = dict(skipped or {})
    f = stats.get(fused)
    if f is None and fused not in skipped:
        skipped[fused] = "fused arm did not run"
    fl = floor_ms(cfg, floor_bytes) if floor_bytes else None
    for ref in references:
        r = stats.get(ref)
        target = target_for(cfg, group, ref)
        ratio = r.median_ms / f.median_ms if (r and f) else None
        row = {
            "group": group,
            "name": name,
            "shape": list(shape) if shape is not None else None,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
            "device": cfg.device,
            "device_name": cfg.device_name,
            "threads": cfg.threads,
            "quick": cfg.quick,
            **extra,
            "reference": ref,
            "fused_ms": f.median_ms if f else None,
            "fused_min_ms": f.min_ms if f else None,
            "fused_max_ms": f.max_ms if f else None,
            "reference_ms": r.median_ms if r else None,
            "reference_min_ms": r.min_ms if r else None,
            "reference_max_ms": r.max_ms if r else None,
            "ratio": ratio,
            "fused_peak_bytes": peaks.get(fused),
            "reference_peak_bytes": peaks.get(ref),
            "floor_ms": fl,
            "floor_fraction": (fl / f.median_ms) if (fl and f) else None,
            "target": target,
            "met": (ratio >= target) if (target is not None and ratio is not None) else None,
        }
        if group in FLOOR_GROUPS and row["floor_fraction"] is not None:
            row["floor_target"] = 0.5
            row["floor_met"] = row["floor_fraction"] >= 0.5
        mt = MEMORY_TARGETS.get((group, ref))
        fp, rp = row["fused_peak_bytes"], row["reference_peak_bytes"]
        if fp is not None and rp is not None:
            row["memory_ratio"] = rp / max(fp, 1)
        if mt is not None:
            row["memory_target"] = mt
            row["memory_met"] = (row.get("memory_ratio") or 0) >= mt if row.get("memory_ratio") is not None else None
        reason = skipped.get(fused) or skipped.get(ref)
        if reason:
            row["skip_reason"] = reason
        rows.append(row)
    return rows


def as_trained(cfg: Config, fn: Optional[Callable]) -> Optional[Callable]:
    """``fn`` as the trainer calls the ops: on a GPU inside ``ops.unchecked_indices()`` (no host-side range
    check of index arguments, which would synchronise the device once per op; the baselines' gathers
    do not check on the host either). Unchanged on the CPU, where the check costs no synchronisation."""
    if fn is None or cfg.device == "cpu":
        return fn
    from iic_ext.ops import unchecked_indices

    def unchecked():
        with unchecked_indices():
            return fn()

    return unchecked


def compare(
    cfg: Config,
    group: str,
    name: str,
    shape,
    dtype,
    arms: Dict[str, Callable],
    floor_bytes: Optional[float] = None,
    skipped: Optional[Dict[str, str]] = None,
    measure_memory: bool = True,
    fused: str = "fused",
    **extra,
) -> List[dict]:
    """Time and measure the memory of ``arms`` (one is ``fused``, run :func:`as_trained`) and return one
    row per baseline."""
    skipped = dict(skipped or {})
    arms = {k: as_trained(cfg, fn) if k == fused else fn for k, fn in arms.items()}
    runnable, first = {}, {}
    for k, fn in arms.items():
        if fn is None:
            continue
        try:  # a failing arm (no kernel for this device, out of memory) is recorded, not fatal
            t0 = time.perf_counter()
            fn()
            cfg.sync()
            first[k] = time.perf_counter() - t0
            runnable[k] = fn
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            skipped[k] = f"{type(e).__name__}: {msg[:200]}"
    stats = time_arms(cfg, runnable, first) if runnable else {}
    peaks = peak_bytes(cfg, runnable) if (measure_memory and runnable) else {}
    refs = [k for k in list(arms) + list(skipped) if k != fused and (arms.get(k) is not None or k in skipped)]
    refs = list(dict.fromkeys(refs))
    rows = make_rows(cfg, group, name, shape, dtype, stats, peaks, floor_bytes, refs, skipped, fused=fused, **extra)
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        fm = f"{r['fused_ms']:.3f}" if r["fused_ms"] is not None else "-"
        rm = f"{r['reference_ms']:.3f}" if r["reference_ms"] is not None else "-"
        tail = f"  [{r['skip_reason']}]" if r.get("skip_reason") else ""
        cfg.log(f"  {group:9s} {name:28s} {str(r.get('variant', '')):24s} vs {r['reference']:10s} fused {fm:>9s} ms  ref {rm:>9s} ms  {ratio}{tail}")
    return rows
