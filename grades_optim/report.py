"""Reports of GradES runs: results/history files, the results table and the plots.

A report folder holds ``results.json`` (context, config and one entry per method), ``history.csv``
(every GradES check: step, component, kind, metric, value, threshold, frozen) and PNG plots:

* ``components.png``: per-component metric curves coloured by kind, with the threshold and the
  freeze markers (the paper's Figure 1); with a relative τ each matrix has its own threshold, so
  a second panel shows metric / threshold against the line 1;
* ``accuracy.png``: validation accuracy against training wall time per method, and the final test
  accuracy of each method at its total wall time.

Plots use matplotlib's Agg backend (no display needed). ``render(dir)`` rebuilds the table and the
plots from a saved folder (``grades-optim report DIR``).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import pathlib
from collections import defaultdict

__all__ = ["HISTORY_FIELDS", "write_results", "write_history", "read_report", "format_table", "freeze_order",
           "plot_components", "plot_accuracy", "render"]

logger = logging.getLogger("grades_optim.report")

HISTORY_FIELDS = ("method", "step", "component", "kind", "metric", "value", "threshold", "frozen")
KIND_COLORS = {"attention": "tab:blue", "mlp": "tab:orange", "other": "tab:gray"}


def write_results(path, payload: dict) -> None:
    pathlib.Path(path).write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")


def write_history(path, rows) -> None:
    """``rows``: dicts with the HISTORY_FIELDS keys (CheckRecord._asdict() plus ``method``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in HISTORY_FIELDS})


def read_report(folder) -> tuple[dict, list[dict]]:
    """(results payload, history rows) of a saved report folder."""
    folder = pathlib.Path(folder)
    results = folder / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{folder} is not a report folder: no results.json")
    try:
        payload = json.loads(results.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{results} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("methods"), list):
        raise ValueError(f"{results} has no 'methods' list: not written by grades-optim")
    history = []
    if (folder / "history.csv").is_file():
        with open(folder / "history.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                r["step"] = int(r["step"])
                for k in ("metric", "value", "threshold"):
                    r[k] = float(r[k])
                r["frozen"] = r["frozen"] == "True"
                history.append(r)
    return payload, history


def format_table(methods: list[dict]) -> str:
    """Markdown table: test accuracy, wall time, steps, frozen fraction, speed-ups."""
    by = {m["method"]: m for m in methods}
    head = ("| method | test acc | Δ vs full (pt) | wall s | steps | frozen | "
            "speedup vs full | speedup vs classic-es | stop |")
    lines = [head, "|" + "---|" * 9]
    for m in methods:
        def ratio(ref):
            return f"{by[ref]['wall_seconds'] / m['wall_seconds']:.2f}×" if ref in by and m["wall_seconds"] else "–"
        delta = f"{100 * (m['test_accuracy'] - by['full']['test_accuracy']):+.1f}" if "full" in by else "–"
        lines.append(f"| {m['method']} | {100 * m['test_accuracy']:.1f}% | {delta} | {m['wall_seconds']:.1f} | "
                     f"{m['steps']}/{m.get('planned_steps', m['steps'])} | {100 * m.get('frozen_ratio', 0):.0f}% | "
                     f"{ratio('full')} | {ratio('classic-es')} | {m.get('stop_reason', '')} |")
    return "\n".join(lines)


def freeze_order(methods: list[dict]) -> str:
    """One line per method with components: when attention vs MLP matrices froze (mean, median, first)."""
    lines = []
    for m in methods:
        comps = m.get("components") or []
        if not comps:
            continue
        parts = []
        for kind in sorted({c["kind"] for c in comps}):
            steps = sorted(c["frozen_at_step"] for c in comps if c["kind"] == kind and c["frozen_at_step"] is not None)
            n = sum(c["kind"] == kind for c in comps)
            if steps:
                parts.append(f"{kind} {len(steps)}/{n} frozen, step mean {sum(steps) / len(steps):.0f} / "
                             f"median {steps[len(steps) // 2]} / first {steps[0]}")
            else:
                parts.append(f"{kind} 0/{n} frozen")
        lines.append(f"{m['method']} freeze order: " + "; ".join(parts))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_components(history: list[dict], path, title: str = "GradES per-component metric",
                    grace_steps: int = 0) -> bool:
    """Figure-1-style plot; returns False (and writes nothing) when there is no history."""
    if not history:
        return False
    plt = _pyplot()
    series = defaultdict(list)
    for r in history:
        series[(r["component"], r["kind"])].append(r)
    relative = len({r["threshold"] for r in history if math.isfinite(r["threshold"])}) > 1
    fig, axes = plt.subplots(2 if relative else 1, 1, figsize=(10, 8 if relative else 5), squeeze=False)
    for row in axes:
        if grace_steps:
            row[0].axvspan(0, grace_steps, color="0.9", zorder=0, label=f"grace period ({grace_steps} steps)")
    ax = axes[0][0]
    for (name, kind), rows in series.items():
        color = KIND_COLORS.get(kind, "tab:gray")
        ax.plot([r["step"] for r in rows], [r["value"] for r in rows], color=color, lw=0.7, alpha=0.6)
        frozen = [r for r in rows if r["frozen"]]
        if frozen:
            ax.plot(frozen[0]["step"], frozen[0]["value"], "x", color="black", ms=5)
    taus = [r["threshold"] for r in history if math.isfinite(r["threshold"])]
    if taus and not relative:
        ax.axhline(taus[0], color="red", ls=":", label=f"threshold τ = {taus[0]:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{history[0].get('metric_name', 'metric')} (compared value)")
    for kind, color in KIND_COLORS.items():
        if any(k == kind for _, k in series):
            ax.plot([], [], color=color, label=kind)
    ax.plot([], [], "x", color="black", label="frozen")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    if relative:
        ax = axes[1][0]
        for (name, kind), rows in series.items():
            pts = [(r["step"], r["value"] / r["threshold"]) for r in rows
                   if math.isfinite(r["threshold"]) and r["threshold"] > 0]
            if pts:
                ax.plot(*zip(*pts), color=KIND_COLORS.get(kind, "tab:gray"), lw=0.7, alpha=0.6)
                frozen = [r for r in rows if r["frozen"]]
                if frozen:
                    ax.plot(frozen[0]["step"], frozen[0]["value"] / frozen[0]["threshold"], "x", color="black", ms=5)
        ax.axhline(1.0, color="red", ls=":", label="threshold (relative τ)")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("metric / own threshold")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy(methods: list[dict], path) -> bool:
    """Validation accuracy vs training wall time per method, plus each final test accuracy."""
    if not methods:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, m in enumerate(methods):
        color = f"C{k}"
        curve = m.get("curve") or []
        if curve:
            ax.plot([c[0] for c in curve], [100 * c[2] for c in curve], "-o", ms=3, color=color,
                    label=f"{m['method']} (validation)")
        ax.plot(m["wall_seconds"], 100 * m["test_accuracy"], "*", ms=14, color=color,
                markeredgecolor="black", label=f"{m['method']} test: {100 * m['test_accuracy']:.1f}%")
    ax.set_xlabel("training wall time (s; classic-es includes its validation passes)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy against wall time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def grace_steps(payload: dict) -> int:
    """The GradES grace period of a saved run, in steps (0 if unknown)."""
    cfg = payload.get("config") or {}
    planned = [m.get("planned_steps") for m in payload.get("methods", []) if m.get("method") == "grades"]
    if not planned or not planned[0] or not isinstance(cfg.get("alpha"), (int, float)):
        return 0
    return int(cfg["alpha"] * planned[0])


def render(folder, *, plots: bool = True) -> str:
    """Re-render the table (returned) and, with ``plots``, the PNGs of a saved report folder."""
    folder = pathlib.Path(folder)
    payload, history = read_report(folder)
    if plots:
        plot_accuracy(payload["methods"], folder / "accuracy.png")
        plot_components(history, folder / "components.png", grace_steps=grace_steps(payload))
    context = payload.get("context", {}).get("line", "")
    order = freeze_order(payload["methods"])
    return format_table(payload["methods"]) + (f"\n\n{order}" if order else "") + (f"\n{context}" if context else "")
