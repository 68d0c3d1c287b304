"""Markdown table and PNG chart of a results list."""
from typing import List


def _ms(v):
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _mb(v):
    return "–" if v is None else f"{v / 2**20:.1f}"


def _shape(s):
    return "×".join(str(v) for v in s) if s else "–"


def _flag(met):
    return "" if met is None else ("yes" if met else "**MISSED**")


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [
        f"# iic_ext benchmarks: {meta['device']} ({meta['device_name']})",
        "",
        f"torch {meta['torch']}, {meta['threads']} thread(s), CPU capability {meta.get('cpu_capability')}, "
        f"copy bandwidth {meta['bandwidth_gbps']:.1f} GB/s, {'--quick' if meta['quick'] else 'full'} run, "
        f"{meta['repeats']} interleaved blocks per arm, commit {_short_commit(meta.get('commit'))}, {meta['date']}, "
        f"load average {meta.get('load_average')}.",
        "",
        "Times are medians (min–max) per call in ms; ratio = baseline / fused (above 1: fused is faster); "
        "floor = bytes a one-pass kernel must move / copy bandwidth, as a fraction of the fused time; "
        "peak = extra bytes allocated during one call, outputs included (MiB).",
        "",
        "| group | op | shape | dtype | layout / variant | baseline | fused ms | baseline ms | ratio | target | met "
        "| floor frac | peak MiB fused / base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fused = f"{_ms(r['fused_ms'])} ({_ms(r['fused_min_ms'])}–{_ms(r['fused_max_ms'])})" if r["fused_ms"] else "–"
        base = f"{_ms(r['reference_ms'])}" if r["reference_ms"] else "–"
        if r.get("skip_reason"):
            base = f"skipped: {r['skip_reason']}"
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "–"
        target = f"≥{r['target']:g}×" if r["target"] is not None else ""
        floor = "–" if r.get("floor_fraction") is None else f"{r['floor_fraction']:.2f}"
        if r.get("floor_met") is False:
            floor += " (<0.5)"
        peak = f"{_mb(r['fused_peak_bytes'])} / {_mb(r['reference_peak_bytes'])}"
        if r.get("memory_target") is not None:
            peak += f" ({r.get('memory_ratio') or 0:.1f}× less, target {r['memory_target']:g}×: {_flag(r.get('memory_met'))})"
        lv = " ".join(str(r[k]) for k in ("layout", "variant") if r.get(k))
        lines.append(
            f"| {r['group']} | {r['name']} | {_shape(r['shape'])} | {r['dtype'] or '–'} | {lv} | {r['reference']} "
            f"| {fused} | {base} | {ratio} | {target} | {_flag(r['met'])} | {floor} | {peak} |"
        )
    missed = {}  # one line per configuration; the floor belongs to the fused arm, said once
    for r in rows:
        key = (r["group"], r["name"], _shape(r["shape"]), r["dtype"],
               ", ".join(str(r[k]) for k in ("layout", "variant") if r.get(k)))
        why = missed.setdefault(key, [])
        if r["met"] is False:
            why.append(f"{r['ratio']:.2f}× vs {r['reference']} (target {r['target']:g}×)")
        if r.get("floor_met") is False and not any("floor" in w for w in why):
            why.append(f"{r['floor_fraction']:.2f} of the bandwidth floor (target ≥ 0.5)")
        if r.get("memory_met") is False:
            why.append(f"peak memory only {r.get('memory_ratio') or 0:.1f}× below {r['reference']} (target {r['memory_target']:g}×)")
    missed = {k: v for k, v in missed.items() if v}
    lines += ["", "## Targets missed", ""]
    if not missed:
        lines.append("None." if any(r["met"] is not None for r in rows) else "No row has a target.")
    for (group, name, shape, dtype, lv), why in missed.items():
        lines.append(f"- {group} / {name} {shape} {dtype} {lv}: " + "; ".join(why))
    skipped = [r for r in rows if r.get("skip_reason")]
    if skipped:
        lines += ["", "## Skipped", ""]
        for r in skipped:
            lines.append(f"- {r['group']} / {r['name']} {_shape(r['shape'])} {r['dtype']} vs {r['reference']}: {r['skip_reason']}")
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _short_commit(commit) -> str:
    commit = str(commit)
    return commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")


def plot(rows: List[dict], meta: dict, path: str) -> bool:
    """Horizontal bars of the speed-up of each row (log scale), coloured by baseline, targets marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["ratio"] is not None]
    if not rows:
        return False
    colors = {"original": "#d62728", "vectorized": "#1f77b4", "dense": "#9467bd", "compiled": "#2ca02c"}
    labels, values, cols, targets = [], [], [], []
    for r in rows:
        lv = "/".join(str(r[k]).split(" (")[0] for k in ("layout", "variant") if r.get(k))
        labels.append(f"{r['group']}: {r['name']} {_shape(r['shape'])} {r['dtype'] or ''} {lv} vs {r['reference']}")
        values.append(r["ratio"])
        cols.append(colors.get(r["reference"], "#7f7f7f"))
        targets.append(r["target"])
    fig, ax = plt.subplots(figsize=(12, 0.28 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(list(y), values, color=cols)
    for i, t in enumerate(targets):
        if t is not None:
            ax.plot([t, t], [i - 0.4, i + 0.4], color="black", lw=1.5)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the fused op (baseline time / fused time); black ticks: targets")
    ax.set_title(f"iic_ext on {meta['device_name']} ({meta['device']}, {meta['threads']} threads"
                 f"{', quick' if meta['quick'] else ''})", fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
