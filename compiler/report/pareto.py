"""The trade-off the budgeted search saw: Pareto front, tables and an optional plot.

An evaluation is a plain dict with at least "cost" (lower is better) and "metric"
(higher is better); see fxopt.search.budget.

    front = pareto_front(evals)              # indices of the non-dominated evaluations
    print(format_evals(evals, front))        # with each one's precision mix ("mix": "int4 2, int8 3, fp32 1")
    plot_front(evals, front, "front.png")    # needs matplotlib; returns None without it; points labelled by mix
"""
from __future__ import annotations

PRECISIONS = ("int4", "int8", "bf16", "fp32")    # the search's ladder, least accurate first


def pareto_front(evals: list[dict]) -> list[int]:
    """Indices of the evaluations no other one beats on both cost and metric.

        pareto_front([{"cost": 1, "metric": 0.9}, {"cost": 2, "metric": 0.8}]) -> [0]
    """
    front = []
    for i, a in enumerate(evals):
        dominated = any(b["cost"] <= a["cost"] and b["metric"] >= a["metric"]
                        and (b["cost"] < a["cost"] or b["metric"] > a["metric"])
                        for j, b in enumerate(evals) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: evals[i]["cost"])


def _table(header: tuple, rows: list[tuple]) -> str:
    table = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_evals(evals: list[dict], front: list[int], chosen: int | None = None) -> str:
    """One line per evaluation: config, precision mix, latency, MACs, metric, drop, budget met, Pareto flag."""
    rows = []
    for i, e in enumerate(evals):
        flag = ("chosen " if i == chosen else "") + ("pareto" if i in front else "")
        rows.append((i, e["label"], e.get("mix", "-"), f"{e['latency_s'] * 1e3:.3f}" if e["latency_s"] else "-",
                     f"{e['macs'] / 1e6:.2f}", f"{e['metric']:.4f}", f"{e['drop']:+.4f}",
                     "yes" if e["meets"] else "no", flag.strip()))
    return _table(("#", "config", "precisions", "latency ms", "MMACs", "metric", "drop", "meets", ""), rows)


def format_layers(layers: list[dict]) -> str:
    """The chosen configuration per layer: precision and why, then per precision the op's
    measured time, SQNR proxy and metric drop of the layer alone at it."""
    precs = [p for p in PRECISIONS if any(p in r.get(k, {}) for r in layers for k in ("ms", "sqnr_db", "alone_drop"))]
    header = ["layer", "prec"]
    for p in precs:
        header += [f"{p} ms"] + ([f"{p} dB", f"{p} drop"] if p != "fp32" else [])
    rows = []
    for r in layers:
        row = [r["layer"], r["precision"]]
        for p in precs:
            row.append(_num(r.get("ms", {}).get(p), "{:.3f}"))
            if p != "fp32":
                row += [_num(r.get("sqnr_db", {}).get(p), "{:.1f}"), _num(r.get("alone_drop", {}).get(p), "{:+.4f}")]
        rows.append(tuple(row + [r["why"]]))
    return _table(tuple(header + ["why"]), rows)


def _num(value, fmt: str) -> str:
    return "-" if value is None or value != value or value in (float("inf"), float("-inf")) else fmt.format(value)


def plot_front(evals: list[dict], front: list[int], path: str, chosen: int | None = None,
               floor: float | None = None, xlabel: str = "latency (ms)") -> str | None:
    """Save cost vs metric of every evaluation, the front as a line, to a PNG at `path`.

    Returns the path, or None when matplotlib is not installed (the plot is optional).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scale = 1e3 if xlabel.startswith("latency") else 1e-6
    x = [e["cost"] * scale for e in evals]
    y = [e["metric"] for e in evals]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x, y, s=14, c="0.6", label="evaluated")
    ax.plot([x[i] for i in front], [y[i] for i in front], "o-", c="C0", label="Pareto front")
    for xi, yi, e in zip(x, y, evals):      # each point's precision mix, e.g. "int4 2, int8 3, fp32 1"
        if e.get("mix"):
            ax.annotate(e["mix"], (xi, yi), fontsize=5, alpha=0.7, xytext=(3, 2), textcoords="offset points")
    if chosen is not None:
        ax.scatter([x[chosen]], [y[chosen]], s=80, marker="*", c="C3", zorder=3, label="chosen")
    if floor is not None:
        ax.axhline(floor, ls="--", c="C1", label="budget")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("metric (eval_fn)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
