"""Tables and plots from a comparison's `runs.jsonl`: results.md/.csv/.json, three PNG plots
(task metric vs trainable parameters with the Pareto frontier, peak memory, training time)
and one self-contained HTML page with the table and the plots embedded."""

from __future__ import annotations

import base64
import csv
import html
import json
import statistics
from typing import Any
from dataclasses import asdict, dataclass
from pathlib import Path

from peftkit.compare import read_runs
from peftkit.errors import PeftkitError

MB = 2**20


@dataclass
class Row:
    """One strategy's runs, aggregated over seeds."""

    strategy: str
    n: int
    metric_mean: float
    metric_std: float | None  # None for one seed: a spread nobody measured is not zero
    other_metrics: dict[str, float]  # the task's other metrics, mean over seeds
    test_metric_mean: float | None   # the metric on a test split, where the data has one
    trainable_params: int
    trainable_percent: float
    peak_memory_mb: float
    estimate_mb: float | None
    train_time_s: float
    samples_per_s: float | None  # None when nothing trained (strategy none)
    tokens_per_s: float | None
    size_on_disk_mb: float

    @property
    def metric_text(self) -> str:
        """Mean ± std over seeds, or the mean alone for a single seed."""
        spread = f" ± {self.metric_std:.4f}" if self.metric_std is not None else ""
        return f"{self.metric_mean:.4f}{spread}"

    @property
    def estimate_ratio(self) -> float | None:
        return self.estimate_mb / self.peak_memory_mb if self.estimate_mb else None


def aggregate(records: list[dict], metric: str, others: tuple[str, ...] = (), greater_is_better: bool = True) -> list[Row]:
    """Successful runs grouped by strategy, best mean metric first."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if record.get("status") == "ok":
            groups.setdefault(record["strategy"], []).append(record)
    rows = []
    for strategy, runs in groups.items():
        values = [r["metrics"][metric] for r in runs]
        other = {m: statistics.mean(r["metrics"][m] for r in runs) for m in others
                 if all(m in r["metrics"] for r in runs)}
        estimates = [r["estimate"]["total_bytes"] / MB for r in runs if "total_bytes" in (r.get("estimate") or {})]
        rows.append(Row(
            strategy=strategy, n=len(runs), metric_mean=statistics.mean(values),
            metric_std=statistics.stdev(values) if len(values) > 1 else None, other_metrics=other,
            test_metric_mean=_mean_or_none((r.get("test_metrics") or {}).get(metric) for r in runs),
            trainable_params=runs[0]["trainable_params"], trainable_percent=runs[0]["trainable_percent"],
            peak_memory_mb=statistics.mean(r["peak_memory_bytes"] for r in runs) / MB,
            estimate_mb=statistics.mean(estimates) if estimates else None,
            train_time_s=statistics.mean(r["train_time_s"] for r in runs),
            samples_per_s=_mean_or_none(r["samples_per_s"] for r in runs),
            tokens_per_s=_mean_or_none(r["tokens_per_s"] for r in runs),
            size_on_disk_mb=statistics.mean(r["size_on_disk_bytes"] for r in runs) / MB,
        ))
    return sorted(rows, key=lambda r: -r.metric_mean if greater_is_better else r.metric_mean)


def _mean_or_none(values: Any) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else statistics.mean(values)


def _rate(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def with_current_estimate(record: dict) -> dict:
    """The record with its memory estimate recomputed by today's `peftkit estimate` from the
    run's own config and data sizes (never from its measurement), so that every row of a table
    is checked against the same estimator, however long ago its run finished. A record whose
    config no longer validates keeps the estimate made when it ran."""
    from pydantic import ValidationError

    from peftkit.estimate import estimate_for
    from peftkit.config import RunConfig, config_values

    if record.get("status") != "ok" or not isinstance(record.get("config"), dict):
        return record
    try:
        config = RunConfig.model_validate(config_values(record))
    except (ValidationError, PeftkitError):
        return record
    estimate = estimate_for(config, record)
    return {**record, "estimate": estimate} if "total_bytes" in estimate else record


def pareto(rows: list[Row], greater_is_better: bool = True) -> list[Row]:
    """Rows no other row beats on both fewer trainable parameters and a better metric (higher,
    or lower for a loss or perplexity)."""
    sign = 1.0 if greater_is_better else -1.0
    frontier, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r.trainable_params, -sign * r.metric_mean)):
        if sign * row.metric_mean > best:
            frontier.append(row)
            best = sign * row.metric_mean
    return frontier


def provenance(records: list[dict]) -> list[str]:
    """Where the numbers come from: commands, machines, package versions, dates."""
    ok = [r for r in records if r.get("status") == "ok"]
    commands = sorted({r["command"] for r in records if r.get("command")})
    devices = sorted({r["device"] for r in ok})
    versions = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in ok})
    dates = sorted(r["finished"][:10] for r in records if r.get("finished"))
    lines = [f"Command: `{c}`" for c in commands]
    lines += [f"Code: {v}" for v in code_versions(records)]
    lines += [f"Machine: {d}" for d in devices] + [f"Packages: {v}" for v in versions]
    lines += [f"Checkpoint: {c}" for c in sorted({_selection(r) for r in ok})]
    lines += [f"Head input: {p}" for p in sorted({_pooling(r) for r in ok if _reads_one_vector(r)})]
    if dates:
        lines.append(f"Date: {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))
    return [line + "  " for line in lines]


def _selection(record: dict) -> str:
    """Which weights a row reports, as its record says."""
    chosen = record.get("selection")
    if not chosen:
        return "best epoch on the validation split it reports (records from before the held-out protocol)"
    if chosen["select"] == "last":
        return "the final weights (select: last)"
    return f"best {chosen['metric']} on a {chosen['on']}; the validation split scored once, at the end"


def _reads_one_vector(record: dict) -> bool:
    """Whether the row's task head reads one vector per example, where pooling applies."""
    from peftkit.tasks import TASKS

    return TASKS[record.get("task_kind", "classification")].reads_one_vector


def _pooling(record: dict) -> str:
    """How a classification row's head read the model."""
    from peftkit.config import config_values

    pooling = config_values(record)["pooling"]
    return {"mean": "mean pooling of the last hidden states (pooling: mean)",
            "model": "the model's own pooled vector or last token (pooling: model)"}.get(pooling, pooling)


def failures(records: list[dict]) -> list[str]:
    """One line per run that did not finish, with its error: a refused strategy is a result too."""
    return [f"- {r['strategy']} (seed {r['seed']}): {r.get('error') or 'no error recorded'}"
            for r in records if r.get("status") != "ok"]


def markdown(rows: list[Row], metric: str, title: str, records: list[dict] | None = None) -> str:
    others = list(rows[0].other_metrics) if rows else []
    tested = any(r.test_metric_mean is not None for r in rows)
    header = ["strategy", "trainable", "trainable %", f"{metric} ({_spread_label(rows)})", *others,
              *([f"test {metric}"] if tested else []), "n", "peak MB", "estimate MB",
              "estimate/measured", "train s", "samples/s", "tokens/s", "disk MB"]
    lines = [f"# {title}", "", *provenance(records or []), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ratio = f"{r.estimate_ratio:.2f}" if r.estimate_ratio else "-"
        estimate = f"{r.estimate_mb:.0f}" if r.estimate_mb else "-"
        extra = "".join(f"{r.other_metrics[m]:.4f} | " if m in r.other_metrics else "- | " for m in others)
        extra += f"{_rate(r.test_metric_mean, 4)} | " if tested else ""
        lines.append(f"| {r.strategy} | {r.trainable_params:,} | {r.trainable_percent:.3f} | "
                     f"{r.metric_text} | {extra}{r.n} | {r.peak_memory_mb:.0f} | {estimate} | {ratio} | "
                     f"{r.train_time_s:.0f} | {_rate(r.samples_per_s, 1)} | {_rate(r.tokens_per_s, 0)} | "
                     f"{r.size_on_disk_mb:.2f} |")
    failed = failures(records or [])
    if failed:
        lines += ["", "Runs that failed:", "", *failed]
    return "\n".join(lines) + "\n"


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


def plots(rows: list[Row], metric: str, out: Path, greater_is_better: bool = True) -> list[Path]:
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
    ax.set_ylabel(f"dev {metric} ({_spread_label(rows)})")
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


def _spread_label(rows: list[Row]) -> str:
    """What a metric cell holds: a mean and standard deviation over seeds, or one seed's value."""
    return "mean ± std" if any(r.n > 1 for r in rows) else "one seed"


def _legend_below(ax: Any) -> None:
    """The legend under the axes, where it can never hide a point or a bar."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False, fontsize=9)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def code_versions(records: list[dict]) -> list[str]:
    """The code versions behind successful records: a commit, marked when the tree was dirty."""
    def version(record: dict) -> str:
        made = record.get("provenance") or {}
        return made.get("commit", "unknown")[:12] + (" (uncommitted changes)" if made.get("dirty") else "")

    return sorted({version(r) for r in records if r.get("status") == "ok"})


def write_report(runs_dir: Path, metric: str | None = None, title: str | None = None,
                 allow_mixed: bool = False, samples: int = 3) -> list[Path]:
    """Write every report file next to runs.jsonl; returns their paths. `metric` defaults to
    the task's headline metric (`tasks.headline_metric`); the task's other metrics get columns
    of their own. Rows made by different code versions are refused unless `allow_mixed`.
    Where runs saved answers, generations.md shows `samples` inputs with every row's answer
    side by side (`peftkit.side_by_side`)."""
    from peftkit.side_by_side import side_by_side
    from peftkit.tasks import TASKS

    records = [with_current_estimate(r) for r in read_runs(runs_dir).values()]
    versions = code_versions(records)
    if len(versions) > 1 and not allow_mixed:
        raise PeftkitError(f"{runs_dir}/runs.jsonl mixes rows made by {len(versions)} code versions ({', '.join(versions)}): "
                           "re-run the old rows with `peftkit compare`, or pass --allow-mixed to report them anyway")
    first = next((r for r in records if r.get("status") == "ok"), None)
    if first is None:
        raise PeftkitError(f"{runs_dir} has no successful runs in runs.jsonl: run `peftkit compare --out {runs_dir}` first")
    task = TASKS[first.get("task_kind", "classification")]
    metric = metric or record_headline(first)
    if metric not in task.metrics:
        raise PeftkitError(f"unknown metric '{metric}' for task {task.name}: choose one of {', '.join(task.metrics)}")
    others = tuple(m for m in task.table_metrics if m != metric)
    rows = aggregate(records, metric, others, task.greater_is_better(metric))
    title = title or f"{first['config']['model']} on {first['config']['task']}: strategies compared"
    table = markdown(rows, metric, title, records)
    (runs_dir / "results.md").write_text(table)
    with (runs_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(rows[0]), "estimate_ratio"])
        writer.writeheader()
        writer.writerows({**asdict(r), "estimate_ratio": r.estimate_ratio} for r in rows)
    (runs_dir / "results.json").write_text(json.dumps([{**asdict(r), "estimate_ratio": r.estimate_ratio} for r in rows], indent=1) + "\n")
    images = plots(rows, metric, runs_dir, task.greater_is_better(metric))
    (runs_dir / "results.html").write_text(_html(title, rows, metric, images, records))
    written = [runs_dir / n for n in ("results.md", "results.csv", "results.json", "results.html")] + images
    generations = side_by_side(runs_dir, records, [r.strategy for r in rows], samples, task.prediction_fields)
    if generations is None:
        (runs_dir / "generations.md").unlink(missing_ok=True)  # an earlier report's would describe other rows
    else:
        (runs_dir / "generations.md").write_text(generations)
        written.append(runs_dir / "generations.md")
    return written


def record_headline(record: dict) -> str:
    """The metric a table of such records leads with: its data set's, else its task kind's
    (`tasks.headline_metric`)."""
    from peftkit.tasks import DATASETS, TASKS, headline_metric

    task = TASKS[record.get("task_kind", "classification")]
    return headline_metric(task, DATASETS.get((record.get("config") or {}).get("task")))


def _html(title: str, rows: list[Row], metric: str, images: list[Path], records: list[dict]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("strategy", "trainable", "%", f"{metric}", "n", "peak MB", "estimate MB",
                                              "est/meas", "train s", "samples/s", "tokens/s", "disk MB"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.strategy, f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}", r.metric_text,
            r.n, f"{r.peak_memory_mb:.0f}", f"{r.estimate_mb:.0f}" if r.estimate_mb else "-",
            f"{r.estimate_ratio:.2f}" if r.estimate_ratio else "-", f"{r.train_time_s:.0f}", _rate(r.samples_per_s, 1),
            _rate(r.tokens_per_s, 0), f"{r.size_on_disk_mb:.2f}")) + "</tr>"
        for r in rows)
    notes = "".join(f"<p>{html.escape(line.strip())}</p>" for line in provenance(records))
    failed = "".join(f"<p>{html.escape(line)}</p>" for line in failures(records))
    figures = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}img{max-width:48%;margin:1%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{notes}<table><tr>{head}</tr>{body}</table>{failed}{figures}</body></html>\n")
