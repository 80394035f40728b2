"""A comparison's records as one row per strategy: seeds aggregated, the memory estimate
recomputed by today's estimator, the Pareto frontier, the metric a table leads with."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.record import CellRecord, RunRecord
from peftkit.resolve import make_config
from peftkit.tasks import DATASETS, TASKS, headline_metric

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


def aggregate(records: list[CellRecord], metric: str, others: tuple[str, ...] = (),
              greater_is_better: bool = True) -> list[Row]:
    """Successful runs grouped by strategy, best mean metric first."""
    groups: dict[str, list[CellRecord]] = {}
    for record in records:
        if record.run is not None:
            groups.setdefault(record.strategy, []).append(record)
    rows = []
    for strategy, cells in groups.items():
        runs = [c.run for c in cells]
        values = [r.metrics[metric] for r in runs]
        other = {m: statistics.mean(r.metrics[m] for r in runs) for m in others if all(m in r.metrics for r in runs)}
        estimates = [c.estimate["total_bytes"] / MB for c in cells if "total_bytes" in (c.estimate or {})]
        rows.append(Row(
            strategy=strategy, n=len(runs), metric_mean=statistics.mean(values),
            metric_std=statistics.stdev(values) if len(values) > 1 else None, other_metrics=other,
            test_metric_mean=_mean_or_none((r.test_metrics or {}).get(metric) for r in runs),
            trainable_params=runs[0].trainable_params, trainable_percent=runs[0].trainable_percent,
            peak_memory_mb=statistics.mean(r.peak_memory_bytes for r in runs) / MB,
            estimate_mb=statistics.mean(estimates) if estimates else None,
            train_time_s=statistics.mean(r.train_time_s for r in runs),
            samples_per_s=_mean_or_none(r.samples_per_s for r in runs),
            tokens_per_s=_mean_or_none(r.tokens_per_s for r in runs),
            size_on_disk_mb=statistics.mean(r.size_on_disk_bytes for r in runs) / MB,
        ))
    return sorted(rows, key=lambda r: -r.metric_mean if greater_is_better else r.metric_mean)


def _mean_or_none(values: Any) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else statistics.mean(values)


def with_current_estimate(record: CellRecord) -> CellRecord:
    """The record with its memory estimate recomputed by today's `peftkit estimate` from the
    run's own config and data sizes (never from its measurement), so that every row of a table
    is checked against the same estimator, however long ago its run finished. A record whose
    config no longer validates keeps the estimate made when it ran."""
    from peftkit.memory.estimate import estimate_for  # loads torch

    if record.run is None:
        return record
    try:
        config = make_config(record.run.config_values())
    except PeftkitError:
        return record
    estimate = estimate_for(config, record.run.dump())
    return record.model_copy(update={"estimate": estimate}) if "total_bytes" in estimate else record


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


def record_headline(record: RunRecord) -> str:
    """The metric a table of such runs leads with: its data set's, else its task kind's
    (`tasks.headline_metric`)."""
    return headline_metric(TASKS[record.task_kind], DATASETS.get(record.config.get("task")))
