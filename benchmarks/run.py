"""Run the iic_ext benchmarks: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

Fused kernels and the whole IIC step against pure PyTorch, time and memory, on the CPU and on CUDA
when present. Writes ``benchmarks/results/<device>.json`` (a list of rows), ``<device>.md`` (a table
saying where a target is missed), ``<device>.png`` (speed-ups) and ``<device>.meta.json`` (machine).
"""
import argparse
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: import this checkout, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import torch  # noqa: E402

GROUPS = ("residual", "negatives", "views", "nce", "step", "loader")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def get_args_parser():
    p = argparse.ArgumentParser("iic_ext benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (under 2 minutes on 2 CPU cores)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups from {','.join(GROUPS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), action="append",
                   help="device to run on (repeatable); default: cpu, and cuda when available")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved blocks per arm (default 5 quick, 11 full)")
    p.add_argument("--out", default=RESULTS, help="results folder")
    p.add_argument("--check", action="store_true", help="only check that the baselines match the reference")
    p.add_argument("--models", default=None,
                   help="step group: comma-separated backbones for its per-model rows (default: every registered one)")
    return p


def run_device(args, device: str, groups, commit=None) -> list:
    """Run the groups on one device and write its results (``commit``: the code measured); returns the
    groups that failed."""
    from . import harness

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = harness.Config(
        device=device, threads=threads, quick=args.quick,
        repeats=args.repeats or (5 if args.quick else 11),
        block_s=0.02 if args.quick else 0.1,
        compile_budget=1 if args.quick else 1_000_000,
        warmup=1 if args.quick else 2,
        models=tuple(m for m in (args.models or "").split(",") if m),
    )
    cfg.device_name = harness.device_name(device)
    cfg.bandwidth_gbps = harness.measure_bandwidth(cfg)
    print(f"== {device}: {cfg.device_name}, {threads} threads, copy bandwidth {cfg.bandwidth_gbps:.1f} GB/s", flush=True)
    notes = []
    if device != "cpu":
        notes.append("the fused arms run inside ops.unchecked_indices(), as the trainer runs them: no host-side range "
                     "check of index arguments (one device synchronisation per op; the baselines' gathers do not "
                     "check on the host either)")
    rows = []
    failed = []
    for group in groups:
        t0 = time.perf_counter()
        print(f"-- {group}", flush=True)
        module = _group_module(group)
        try:
            got = module(cfg)
        except _Unavailable as e:
            notes.append(f"{group}: not run ({e})")
            print(f"  not run: {e}", flush=True)
            continue
        except Exception as e:  # keep the other groups' rows; the run still exits non-zero
            traceback.print_exc()
            notes.append(f"{group}: FAILED ({type(e).__name__}: {e})")
            failed.append(group)
            continue
        if isinstance(got, tuple):
            got, group_notes = got
            notes += group_notes
        rows += got
        print(f"   {group} done in {time.perf_counter() - t0:.1f} s", flush=True)
        if group != groups[-1]:  # a run cut short keeps the groups it finished
            _write(args.out, device, rows, {**harness.metadata(cfg, commit), "notes": notes}, quiet=True)
    meta = harness.metadata(cfg, commit)
    meta["notes"] = notes
    _write(args.out, device, rows, meta)
    return failed


class _Unavailable(RuntimeError):
    """A group whose inputs (models, NCE ops, loader) are not in this checkout."""


def _group_module(group):
    if group in ("residual", "negatives", "views"):
        from . import bench_views

        return getattr(bench_views, f"bench_{group}")

    def lazy(cfg):
        try:
            mod = __import__(f"benchmarks.bench_{group}", fromlist=["run"])
        except ImportError as e:
            raise _Unavailable(f"benchmarks/bench_{group}.py could not be imported: {e}")
        try:
            return mod.run(cfg)
        except ImportError as e:
            raise _Unavailable(str(e))

    return lazy


def _write(folder, device, rows, meta, quiet=False):
    from . import report

    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, device)
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(base + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(report.markdown(rows, meta))
    made = report.plot(rows, meta, base + ".png")
    if not quiet:
        print(f"wrote {base}.json, .md, .meta.json{', .png' if made else ' (no plot: matplotlib missing or no ratios)'}")


def main(args) -> int:
    t0 = time.perf_counter()
    from iic_ext import ops

    if not ops.HAS_C:
        from iic_ext.ops import _library

        print(
            "iic_ext benchmarks: the compiled operators are not loaded "
            f"({_library.LOAD_ERROR}).\nThe ops would fall back to the pure-PyTorch reference and every "
            "comparison would measure the reference against itself. Build first:\n"
            "    python setup.py build_ext --inplace     (or: pip install --no-build-isolation .)",
            file=sys.stderr,
        )
        return 2
    from . import baselines

    baselines.check()
    if args.check:
        print("baselines match the reference")
        return 0
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        print(f"unknown group(s) {bad}; choose from {GROUPS}", file=sys.stderr)
        return 2
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    from . import harness

    # the commit measured, read before any result is written (the results folder may hold tracked files)
    commit = harness.git_commit()
    failed = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda requested but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        failed += [f"{device}:{g}" for g in run_device(args, device, groups, commit)]
    print(f"total {time.perf_counter() - t0:.1f} s")
    if failed:
        print(f"failed groups: {', '.join(failed)} (their tracebacks are above)", file=sys.stderr)
        return 1
    return 0


def cli():
    sys.exit(main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
