"""Where the time of one NCE step goes: host (enqueueing) against device, and the device's kernels.

``python -m benchmarks.profile_nce --device cuda`` runs the ``nce`` group's step (scores or fused loss,
backward, the three bank updates; ``bench_nce``) for each arm and shape and prints

* ``enqueue``: wall time per step of issuing ``--steps`` steps without waiting for the device, and
  ``total``: the same steps until the device is done. ``enqueue`` close to ``total`` means the step is
  bound by host work (Python, dispatch, autograd, launches), not by the kernels;
* for the fused arms, ``torch.profiler``'s table of ten steps (self device time per kernel and op).

This explains the ``nce`` rows of ``python -m benchmarks``; it is not a benchmark itself (no interleaved
blocks, no CUDA-event timing). The fused arms run as there (``harness.as_trained``: inside
``ops.unchecked_indices()`` on a GPU).
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from . import bench_nce
from .harness import Config, as_trained


def get_args_parser():
    p = argparse.ArgumentParser("iic_ext NCE step profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=int, default=3, help="the first N shapes (B, K, D, N) of the nce group")
    p.add_argument("--steps", type=int, default=50, help="steps per timing")
    p.add_argument("--arms", default="fused,original", help="comma-separated arms from fused,original,dense")
    p.add_argument("--rows", type=int, default=14, help="rows of each profiler table (0: no profile)")
    return p


def main(args):
    cfg = Config(device=args.device, threads=torch.get_num_threads(), quick=False)
    arms_wanted = args.arms.split(",")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for B, K, D, N in bench_nce.CONFIGS[: args.shapes]:
        l, ab, neg, banks, idx, y = bench_nce.step_inputs(B, K, D, N, args.device)
        for row, arms in bench_nce._arms().items():
            for arm in arms_wanted:
                losses, update = arms[arm]
                step = bench_nce._make_step(losses, update, l, ab, neg, [bench_nce._bank_like(b) for b in banks], idx, y)
                if arm == "fused":  # as the benchmark times it
                    step = as_trained(cfg, step)
                for _ in range(5):
                    step()
                cfg.sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                t1 = time.perf_counter()
                cfg.sync()
                t2 = time.perf_counter()
                print(f"== B={B} K={K} D={D} N={N} {row} {arm}: enqueue {1e3 * (t1 - t0) / args.steps:.3f} ms/step, "
                      f"total {1e3 * (t2 - t0) / args.steps:.3f} ms/step", flush=True)
                if arm == "fused" and args.rows > 0:
                    with profile(activities=activities) as prof:
                        for _ in range(10):
                            step()
                        cfg.sync()
                    print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows,
                                                    max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
