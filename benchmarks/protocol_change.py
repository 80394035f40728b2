"""How the comparison protocol changed a published table, strategy by strategy.

    python benchmarks/protocol_change.py --table minilm-sst2=31d2991 --table minilm-rte=f37ce5e \
        --table smollm2-sst2=f37ce5e --out benchmarks/results/protocol_change

Reads records only; trains nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

from harness import command_line, write_result

from peftkit.compare import parse_runs
from peftkit.record import CellRecord, RunRecord
from peftkit.report.rows import record_headline

CLONE = Path(__file__).resolve().parents[1]
EXPLAINED = """Each `--table NAME=COMMIT` sets the table's records as COMMIT published them
(`benchmarks/results/NAME/runs.jsonl` there: the old protocol, which restored the epoch that
scored best on the validation split and reported that same split) beside its records in this
checkout (the current protocol: the checkpoint chosen on a slice held out from the training
data, or the last weights, the validation split scored once at the end, one reading of the
model in every row). Per strategy: the old reported score, the old runs' own last-epoch score
on validation (what they reached without choosing on the split they report: the share of the
change that selection explains) and the new score, each a mean over seeds (count in brackets)."""


def ok_records(text: str, source: str) -> list[CellRecord]:
    """The successful records of a runs.jsonl text, as `peftkit compare` reads it."""
    return [r for r in parse_runs(text, source).values() if r.run is not None]


def old_records(table: str, commit: str) -> list[CellRecord]:
    """The table's records in the commit that published it under the old protocol."""
    path = f"benchmarks/results/{table}/runs.jsonl"
    shown = subprocess.run(["git", "-C", str(CLONE), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"error: {path} is not in commit {commit}: name the commit that published the old table")
    return ok_records(shown.stdout, f"{commit}:{path}")


def new_records(table: str) -> list[CellRecord]:
    """The table's records in this checkout, which must all come from the current protocol."""
    path = CLONE / "benchmarks" / "results" / table / "runs.jsonl"
    records = ok_records(path.read_text(), str(path)) if path.is_file() else []
    if not records or any(r.run.selection is None for r in records):
        sys.exit(f"error: {path} does not hold the regenerated table (no records, or records made before the held-out "
                 "selection protocol): finish the table first (bash benchmarks/tables.sh NAME)")
    return records


def by_strategy(records: list[CellRecord], score: Callable[[RunRecord], float | None]) -> dict[str, list[float]]:
    """Each strategy's scores over its seeds (runs without one are left out)."""
    groups: dict[str, list[float]] = {}
    for record in records:
        value = score(record.run)
        if value is not None:
            groups.setdefault(record.strategy, []).append(value)
    return groups


def mean_text(values: list[float] | None) -> str:
    """Mean ± std (seeds), or '-' when the strategy has no score on that side."""
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread} ({len(values)})"


def difference(new: list[float] | None, old: list[float] | None) -> str:
    """The change of the means, or '-' when a side is missing."""
    return f"{statistics.mean(new) - statistics.mean(old):+.4f}" if new and old else "-"


def table_text(table: str, commit: str) -> str:
    """One table's section: the per-strategy comparison and what the old selection gained."""
    old, new = old_records(table, commit), new_records(table)
    metric = record_headline(new[0].run)
    reported = by_strategy(old, lambda r: r.metrics.get(metric))
    last_epoch = by_strategy(old, lambda r: (r.eval_history or [{}])[-1].get(metric))
    now = by_strategy(new, lambda r: r.metrics.get(metric))
    commits = sorted({r.run.provenance.commit[:7] for r in new if r.run.provenance})
    lines = [f"## {table}: {metric} on the validation split", "",
             f"Old: `benchmarks/results/{table}/runs.jsonl` at {commit[:7]}; new: made by {', '.join(commits)}.", "",
             "| strategy | old, reported (best epoch on validation) | old, last epoch | new (validation scored once) "
             "| new - old reported | new - old last epoch |", "|---|---|---|---|---|---|"]
    for strategy in sorted(set(reported) | set(now), key=lambda s: -statistics.mean(now.get(s) or reported[s])):
        lines.append(f"| {strategy} | {mean_text(reported.get(strategy))} | {mean_text(last_epoch.get(strategy))} "
                     f"| {mean_text(now.get(strategy))} | {difference(now.get(strategy), reported.get(strategy))} "
                     f"| {difference(now.get(strategy), last_epoch.get(strategy))} |")
    several = [r.run for r in old if len(r.run.eval_history) > 1 and metric in r.run.eval_history[-1]]
    gains = [r.metrics[metric] - r.eval_history[-1][metric] for r in several]
    lines.append("")
    if gains:
        lines.append(f"The old protocol's choice on the split it reported: the best epoch beat the last by "
                     f"{statistics.mean(gains):+.4f} on average (largest {max(gains):+.4f}) over {len(gains)} runs "
                     f"of more than one epoch (of {len(old)}).")
    else:
        lines.append("No old run was evaluated at more than one epoch: the old protocol had nothing to choose between.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="How the comparison protocol changed published tables.")
    parser.add_argument("--table", action="append", required=True, metavar="NAME=COMMIT",
                        help="a published table and the commit whose runs.jsonl holds its old-protocol records")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md")
    args = parser.parse_args()
    pairs = [spec.split("=", 1) for spec in args.table]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        sys.exit("error: --table takes NAME=COMMIT, e.g. --table minilm-sst2=31d2991")
    command = command_line(__file__)
    text = "\n".join([f"# The comparison protocol, old against new\n\nCommand: `{command}`\n", EXPLAINED, "",
                      *(table_text(name, commit) for name, commit in pairs)])
    write_result(args.out, command, text)
    print(text)


if __name__ == "__main__":
    main()
