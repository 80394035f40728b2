"""The comparison table as results.md, results.csv and results.json, and the lines every
rendering shares: where the numbers come from, which runs failed, how a cell is written."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from peftkit.record import CellRecord, RunRecord
from peftkit.report.rows import Row
from peftkit.tasks import TASKS


def cell(value: float | None, digits: int) -> str:
    """A number a row may lack (a rate where nothing trained, a test metric without a test split)."""
    return "-" if value is None else f"{value:.{digits}f}"


def spread_label(rows: list[Row]) -> str:
    """What a metric cell holds: a mean and standard deviation over seeds, or one seed's value."""
    return "mean ± std" if any(r.n > 1 for r in rows) else "one seed"


def provenance(records: list[CellRecord]) -> list[str]:
    """Where the numbers come from: commands, machines, package versions, dates."""
    ok = [r.run for r in records if r.run is not None]
    commands = sorted({r.command for r in records if r.command})
    devices = sorted({r.device for r in ok})
    versions = sorted({", ".join(f"{k} {v}" for k, v in r.versions.items()) for r in ok})
    dates = sorted(r.finished[:10] for r in records if r.finished)
    lines = [f"Command: `{c}`" for c in commands]
    lines += [f"Code: {v}" for v in code_versions(records)]
    lines += [f"Machine: {d}" for d in devices] + [f"Packages: {v}" for v in versions]
    lines += [f"Checkpoint: {c}" for c in sorted({_selection(r) for r in ok})]
    lines += [f"Head input: {p}" for p in sorted({_pooling(r) for r in ok if _reads_one_vector(r)})]
    if dates:
        lines.append(f"Date: {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))
    return [line + "  " for line in lines]


def _selection(record: RunRecord) -> str:
    """Which weights a row reports, as its record says."""
    chosen = record.selection
    if chosen is None:
        return "best epoch on the validation split it reports (records from before the held-out protocol)"
    if chosen.select == "last":
        return "the final weights (select: last)"
    return f"best {chosen.metric} on a {chosen.on}; the validation split scored once, at the end"


def _reads_one_vector(record: RunRecord) -> bool:
    """Whether the row's task head reads one vector per example, where pooling applies."""
    return TASKS[record.task_kind].reads_one_vector


def _pooling(record: RunRecord) -> str:
    """How a classification row's head read the model."""
    pooling = record.config_values()["pooling"]
    return {"mean": "mean pooling of the last hidden states (pooling: mean)",
            "model": "the model's own pooled vector or last token (pooling: model)"}.get(pooling, pooling)


def failures(records: list[CellRecord]) -> list[str]:
    """One line per run that did not finish, with its error: a refused strategy is a result too."""
    return [f"- {r.strategy} (seed {r.seed}): {r.error or 'no error recorded'}" for r in records if r.status != "ok"]


def code_versions(records: list[CellRecord]) -> list[str]:
    """The code versions behind successful records: a commit, marked when the tree was dirty."""
    def version(record: RunRecord) -> str:
        made = record.provenance
        if made is None:  # records from before provenance was kept
            return "unknown"
        return made.commit[:12] + (" (uncommitted changes)" if made.dirty else "")

    return sorted({version(r.run) for r in records if r.run is not None})


def markdown(rows: list[Row], metric: str, title: str, records: list[CellRecord] | None = None) -> str:
    others = list(rows[0].other_metrics) if rows else []
    tested = any(r.test_metric_mean is not None for r in rows)
    header = ["strategy", "trainable", "trainable %", f"{metric} ({spread_label(rows)})", *others,
              *([f"test {metric}"] if tested else []), "n", "peak MB", "estimate MB",
              "estimate/measured", "train s", "samples/s", "tokens/s", "disk MB"]
    lines = [f"# {title}", "", *provenance(records or []), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ratio = f"{r.estimate_ratio:.2f}" if r.estimate_ratio else "-"
        estimate = f"{r.estimate_mb:.0f}" if r.estimate_mb else "-"
        extra = "".join(f"{r.other_metrics[m]:.4f} | " if m in r.other_metrics else "- | " for m in others)
        extra += f"{cell(r.test_metric_mean, 4)} | " if tested else ""
        lines.append(f"| {r.strategy} | {r.trainable_params:,} | {r.trainable_percent:.3f} | "
                     f"{r.metric_text} | {extra}{r.n} | {r.peak_memory_mb:.0f} | {estimate} | {ratio} | "
                     f"{r.train_time_s:.0f} | {cell(r.samples_per_s, 1)} | {cell(r.tokens_per_s, 0)} | "
                     f"{r.size_on_disk_mb:.2f} |")
    failed = failures(records or [])
    if failed:
        lines += ["", "Runs that failed:", "", *failed]
    return "\n".join(lines) + "\n"


def write_tables(runs_dir: Path, rows: list[Row], metric: str, title: str, records: list[CellRecord]) -> list[Path]:
    """results.md (`markdown`), and every row's fields with its estimate ratio as results.csv
    and results.json; returns their paths."""
    (runs_dir / "results.md").write_text(markdown(rows, metric, title, records))
    with (runs_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(rows[0]), "estimate_ratio"])
        writer.writeheader()
        writer.writerows({**asdict(r), "estimate_ratio": r.estimate_ratio} for r in rows)
    (runs_dir / "results.json").write_text(json.dumps([{**asdict(r), "estimate_ratio": r.estimate_ratio} for r in rows], indent=1) + "\n")
    return [runs_dir / n for n in ("results.md", "results.csv", "results.json")]
