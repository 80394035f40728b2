"""`write_report`: the files `peftkit report` writes beside a comparison's runs.jsonl, in turn:
the tables, the plots, the HTML page and, where runs saved answers, generations.md."""

from __future__ import annotations

from pathlib import Path

from peftkit.compare import read_runs
from peftkit.errors import PeftkitError
from peftkit.report.generations import side_by_side
from peftkit.report.html import html_page
from peftkit.report.plots import write_plots
from peftkit.report.rows import aggregate, record_headline, with_current_estimate
from peftkit.report.tables import code_versions, write_tables
from peftkit.tasks import TASKS


def write_report(runs_dir: Path, metric: str | None = None, title: str | None = None,
                 allow_mixed: bool = False, samples: int = 3) -> list[Path]:
    """Write every report file next to runs.jsonl; returns their paths. `metric` defaults to
    the task's headline metric (`tasks.headline_metric`); the task's other metrics get columns
    of their own. Rows made by different code versions are refused unless `allow_mixed`.
    Where runs saved answers, generations.md shows `samples` inputs with every row's answer
    side by side (`peftkit.report.generations`)."""
    records = [with_current_estimate(r) for r in read_runs(runs_dir).values()]
    versions = code_versions(records)
    if len(versions) > 1 and not allow_mixed:
        raise PeftkitError(f"{runs_dir}/runs.jsonl mixes rows made by {len(versions)} code versions ({', '.join(versions)}): "
                           "re-run the old rows with `peftkit compare`, or pass --allow-mixed to report them anyway")
    first = next((r.run for r in records if r.run is not None), None)
    if first is None:
        raise PeftkitError(f"{runs_dir} has no successful runs in runs.jsonl: run `peftkit compare --out {runs_dir}` first")
    task = TASKS[first.task_kind]
    metric = metric or record_headline(first)
    if metric not in task.metrics:
        raise PeftkitError(f"unknown metric '{metric}' for task {task.name}: choose one of {', '.join(task.metrics)}")
    others = tuple(m for m in task.table_metrics if m != metric)
    rows = aggregate(records, metric, others, task.greater_is_better(metric))
    title = title or f"{first.config['model']} on {first.config['task']}: strategies compared"
    written = write_tables(runs_dir, rows, metric, title, records)
    images = write_plots(rows, metric, runs_dir, task.greater_is_better(metric))
    (runs_dir / "results.html").write_text(html_page(title, rows, metric, images, records))
    written += [runs_dir / "results.html", *images]
    generations = side_by_side(runs_dir, records, [r.strategy for r in rows], samples, task.prediction_fields)
    if generations is None:
        (runs_dir / "generations.md").unlink(missing_ok=True)  # an earlier report's would describe other rows
    else:
        (runs_dir / "generations.md").write_text(generations)
        written.append(runs_dir / "generations.md")
    return written
