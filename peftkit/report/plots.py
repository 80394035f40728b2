"""The comparison's three PNG plots: the task metric against trainable parameters with the
Pareto frontier, peak memory (measured, with the estimate), and training time. matplotlib is
imported where a plot is drawn, not when the report package loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.report.rows import Row, pareto
from peftkit.report.tables import spread_label


def label_offsets(ax: Any, points: list[tuple[float, float]], labels: list[str],
                  size: float = 9.0) -> list[tuple[float, float]]:
    """Offsets (in points) that keep point labels from overlapping: each label sits up and to
    the right of its point, moved down a line at a time, in order of height, until its box
    clears every label placed before it."""
    ax.autoscale_view()
    per_point = ax.figure.dpi / 72
    boxes: list[tuple[float, float, float, float]] = []
    offsets: list[tuple[float, float]] = [(0.0, 0.0)] * len(points)
    for i in sorted(range(len(points)), key=lambda i: -points[i][1]):
        x, y = ax.transData.transform(points[i]) / per_point  # display position, in points
        width, dy = 0.6 * size * len(labels[i]), 4.0
        while any(x + 6 < bx1 and bx0 < x + 6 + width and y + dy < by1 and by0 < y + dy + size
                  for bx0, by0, bx1, by1 in boxes):
            dy -= size
        boxes.append((x + 6, y + dy, x + 6 + width, y + dy + size))
        offsets[i] = (6.0, dy)
    return offsets


def write_plots(rows: list[Row], metric: str, out: Path, greater_is_better: bool = True) -> list[Path]:
    """Three PNGs, labelled with units; the frontier follows the metric's direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.errorbar(r.trainable_params, r.metric_mean, yerr=r.metric_std or 0.0, fmt="o", capsize=4)
    ax.set_xscale("log")
    points = [(r.trainable_params, r.metric_mean) for r in rows]
    for r, point, offset in zip(rows, points, label_offsets(ax, points, [r.strategy for r in rows])):
        moved = offset[1] < 0  # a label pushed below its point gets a leader line to it
        ax.annotate(r.strategy, point, textcoords="offset points", xytext=offset, fontsize=9,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if moved else None)
    front = pareto(rows, greater_is_better)
    ax.step([r.trainable_params for r in front], [r.metric_mean for r in front], where="post", linestyle="--",
            color="grey", label="Pareto frontier")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"dev {metric} ({spread_label(rows)})")
    ax.set_title(f"{metric} vs trainable parameters")
    _legend_below(ax)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "metric_vs_params.png"))

    for attribute, label, name in (("peak_memory_mb", "peak memory (MB)", "peak_memory.png"),
                                   ("train_time_s", "training time without evaluation (s)", "train_time.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = [r.strategy for r in rows]
        ax.bar(names, [getattr(r, attribute) for r in rows], color="tab:blue", label="measured")
        if attribute == "peak_memory_mb" and any(r.estimate_mb for r in rows):
            ax.scatter(names, [r.estimate_mb or float("nan") for r in rows], color="tab:orange", zorder=3, label="estimate")
            _legend_below(ax)
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} per strategy")
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", rotation_mode="anchor")  # long names never collide
        ax.grid(axis="y", alpha=0.3)
        paths.append(_save(fig, out / name))
    return paths


def _legend_below(ax: Any) -> None:
    """The legend under the axes, where it can never hide a point or a bar."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False, fontsize=9)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
