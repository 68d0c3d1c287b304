"""The demo table: every objective trained by ``python -m iic_ext.train`` on the built-in synthetic data
(its default demo preset, same data and budget), then clip retrieval against random initialisation.

    python -m benchmarks.demo_objectives                      # all rows, seeds 632 1 2 for the default
    python -m benchmarks.demo_objectives --runs-dir runs/demo --out benchmarks/results

A run folder that already holds a finished checkpoint is reused, so an interrupted table resumes. Each
row: the final epoch's loss against the uniform level, the contrastive top-1 (mean of the two views)
against chance, the training time, and retrieval top-1/5/10 of the trained backbone and of random
initialisation on the same videos (residual view, 200 test against 128 training videos). Writes
``demo-objectives.json`` and ``demo-objectives.md``.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

# (row name, trainer flags); the first is the demo's default objective, trained with every seed
CONFIGS = [
    ("memory", "memory (default)", []),
    ("memory-none", "memory, --neg none (CMC)", ["--neg", "none"]),
    ("moco", "moco", ["--objective", "moco"]),
    ("moco-m999", "moco, --moco-m 0.999", ["--objective", "moco", "--moco-m", "0.999"]),
    ("simclr", "simclr", ["--objective", "simclr"]),
    ("original", "memory, the original recipe's contrast", [
        "--no-normalize-features", "--nce-t", "0.07", "--nce-k", "1024", "--lr", "0.01", "--lr-schedule",
        "multistep", "--milestones", "45", "90", "125", "160", "--lr-gamma", "0.2", "--warmup-epochs", "0"]),
]


def get_args_parser():
    p = argparse.ArgumentParser("demo objectives table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=os.path.join("runs", "demo-objectives"))
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[632, 1, 2], help="seeds of the default objective")
    p.add_argument("--other-seeds", type=int, nargs="+", default=[632], help="seeds of the other rows")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    p.add_argument("--note", default="", help="a line on how the runs were made (machine, threads), for the table")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW",
                   help=f"rows to run, from {[c[0] for c in CONFIGS]} (default: all)")
    return p


def _run(cmd, env):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m"] + cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - t0


def _finished(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "last.pth")):
        return None
    with open(path, encoding="utf-8") as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(folder, "args.json"), encoding="utf-8") as f:
        total = json.load(f)["epochs"]
    return epochs if epochs and epochs[-1]["epoch"] == total else None


def _retrieval(ckpt, out, seed, env):
    cmd = ["iic_ext.retrieve", "--no-plot", "--no-progress", "--out", out, "--feature-dir",
           os.path.join(out, "features")]
    cmd += ["--ckpt", ckpt] if ckpt else ["--ckpt", "none", "--seed", str(seed), "--data-seed", str(seed)]
    _run(cmd, env)
    with open(os.path.join(out, "retrieval.json"), encoding="utf-8") as f:
        return json.load(f)


def main(args):
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    for i, (slug, name, flags) in enumerate(CONFIGS):
        if args.only and slug not in args.only:
            continue
        for seed in (args.seeds if i == 0 else args.other_seeds):
            folder = os.path.join(args.runs_dir, f"{slug}_s{seed}")
            epochs = _finished(folder)
            if epochs is None:
                print(f"training {name}, seed {seed} -> {folder}", flush=True)
                _run(["iic_ext.train", "--no-progress", "--seed", str(seed), "--out", folder] + flags, env)
                epochs = _finished(folder)
            last = epochs[-1]
            trained = _retrieval(os.path.join(folder, "last.pth"), os.path.join(folder, "retrieval"), seed, env)
            random = _retrieval(None, os.path.join(args.runs_dir, f"random_s{seed}"), seed, env)
            row = {"name": name, "flags": flags, "seed": seed, "epochs": last["epoch"],
                   "train_s": sum(e["time"] for e in epochs), "loss": last["loss"],
                   "uniform": 2 * math.log(1.0 / last["chance"]), "top1_contrastive": (last["top1_1"] + last["top1_2"]) / 2,
                   "chance": last["chance"], "first_top1_contrastive": (epochs[0]["top1_1"] + epochs[0]["top1_2"]) / 2,
                   "retrieval": {k: trained[f"top{k}"] for k in (1, 5, 10)},
                   "random_init": {k: random[f"top{k}"] for k in (1, 5, 10)}}
            rows.append(row)
            print(f"{name} seed {seed}: loss {row['loss']:.3f} (uniform {row['uniform']:.2f}), contrastive top-1 "
                  f"{row['top1_contrastive']:.3f} (chance {row['chance']:.4f}), retrieval top-1 "
                  f"{100 * row['retrieval'][1]:.1f} vs random {100 * row['random_init'][1]:.1f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo-objectives.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    md = markdown(rows, args.note)
    with open(os.path.join(args.out, "demo-objectives.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return rows


def markdown(rows, note=""):
    lines = ["# The demo's objectives on the synthetic data", "",
             "`python -m benchmarks.demo_objectives`: each row is `python -m iic_ext.train` (demo preset: "
             "R3D-10, res + repeat, 40 epochs on 128 videos of 8x16x16 clips) with the flags shown, then "
             "`python -m iic_ext.retrieve` (residual view, 200 test against 128 training videos, chance 10%) "
             "of its checkpoint and of random initialisation with the same seed (which also generates the "
             "videos). Training: the sum of the run's epoch times." + (f" {note}" if note else ""), "",
             "| objective | seed | final loss (uniform) | contrastive top-1: first → last epoch (chance) | "
             "retrieval top-1 / 5 / 10 | random init top-1 / 5 / 10 | training |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda d: " / ".join(f"{100 * d[k]:.1f}" for k in (1, 5, 10))  # noqa: E731
    for r in rows:
        lines.append(f"| {r['name']} | {r['seed']} | {r['loss']:.2f} ({r['uniform']:.2f}) | "
                     f"{r['first_top1_contrastive']:.3f} → {r['top1_contrastive']:.3f} ({r['chance']:.4f}) | "
                     f"{pct(r['retrieval'])} | {pct(r['random_init'])} | {r['train_s']:.0f} s |")
    default = [r for r in rows if r["name"] == rows[0]["name"]]
    if len(default) > 1:
        t = [100 * r["retrieval"][1] for r in default]
        b = [100 * r["random_init"][1] for r in default]
        lines += ["", f"{rows[0]['name']} over seeds {', '.join(str(r['seed']) for r in default)}: retrieval top-1 "
                      f"{statistics.mean(t):.1f} (range {min(t):.1f}-{max(t):.1f}) against random init "
                      f"{statistics.mean(b):.1f} ({min(b):.1f}-{max(b):.1f}): {statistics.mean(t) / statistics.mean(b):.2f}x, "
                      f"{statistics.mean(t) - statistics.mean(b):+.1f} points."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
