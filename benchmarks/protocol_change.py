"""How the comparison protocol changed a published table, strategy by strategy.

    python benchmarks/protocol_change.py --table minilm-sst2=31d2991 --table minilm-rte=f37ce5e \
        --table smollm2-sst2=f37ce5e --out benchmarks/results/protocol_change

Each `--table NAME=COMMIT` reads the table's records as that commit published them
(`benchmarks/results/NAME/runs.jsonl` at COMMIT: the old protocol, which restored the epoch
that scored best on the validation split and reported that same split) and its records in this
checkout (the current protocol: the checkpoint chosen on a slice held out from the training
data, or the last weights, and the validation split scored once at the end; one reading of the
model in every row). Per strategy it shows the old reported score, the old runs' own last-epoch
score on validation (what those runs reached without choosing on the split they report: the
selection's share of the change) and the new score, each the mean over seeds. Reading records
only, it trains nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLONE = HERE.parent


def ok_records(text: str) -> list[dict]:
    """The successful records of a runs.jsonl text, the last record per (strategy, seed) as
    `peftkit compare` reads them (a partial last line is skipped)."""
    records: dict[tuple[str, int], dict] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["strategy"], record["seed"]] = record
    return [r for r in records.values() if r.get("status") == "ok"]


def old_records(table: str, commit: str) -> list[dict]:
    path = f"benchmarks/results/{table}/runs.jsonl"
    shown = subprocess.run(["git", "-C", str(CLONE), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"error: {path} is not in commit {commit}: name the commit that published the old table")
    return ok_records(shown.stdout)


def headline(records: list[dict]) -> str:
    """The metric the table leads with (the data set's, else its task kind's)."""
    from peftkit.tasks import DATASETS, TASKS, headline_metric

    first = records[0]
    return headline_metric(TASKS[first.get("task_kind", "classification")], DATASETS.get(first["config"]["task"]))


def by_strategy(records: list[dict], score) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for record in records:
        value = score(record)
        if value is not None:
            groups.setdefault(record["strategy"], []).append(value)
    return groups


def mean_text(values: list[float] | None) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread} ({len(values)})"


def difference(new: list[float] | None, old: list[float] | None) -> str:
    return f"{statistics.mean(new) - statistics.mean(old):+.4f}" if new and old else "-"


def table_text(table: str, commit: str) -> str:
    old = old_records(table, commit)
    new_path = CLONE / "benchmarks" / "results" / table / "runs.jsonl"
    if not new_path.exists():
        sys.exit(f"error: {new_path} does not exist: publish the regenerated table first")
    new = ok_records(new_path.read_text())
    if not old or not new:
        sys.exit(f"error: {table}: no successful records {'at ' + commit if not old else 'in ' + str(new_path)}")
    metric = headline(new)
    reported = by_strategy(old, lambda r: r["metrics"].get(metric))
    last_epoch = by_strategy(old, lambda r: (r.get("eval_history") or [{}])[-1].get(metric))
    now = by_strategy(new, lambda r: r["metrics"].get(metric))
    commits = sorted({(r.get("provenance") or {}).get("commit", "unknown")[:7] for r in new})
    lines = [f"## {table}: {metric} on the validation split, mean ± std (seeds)", "",
             f"Old: `benchmarks/results/{table}/runs.jsonl` at {commit[:7]}; new: made by {', '.join(commits)}.", "",
             "| strategy | old, reported (best epoch on validation) | old, last epoch | new (validation scored once) "
             "| new - old reported | new - old last epoch |", "|---|---|---|---|---|---|"]
    for strategy in sorted(set(reported) | set(now), key=lambda s: -statistics.mean(now.get(s) or reported[s])):
        lines.append(f"| {strategy} | {mean_text(reported.get(strategy))} | {mean_text(last_epoch.get(strategy))} "
                     f"| {mean_text(now.get(strategy))} | {difference(now.get(strategy), reported.get(strategy))} "
                     f"| {difference(now.get(strategy), last_epoch.get(strategy))} |")
    peeked = [statistics.mean(reported[s]) - statistics.mean(last_epoch[s]) for s in reported if s in last_epoch]
    if peeked:
        lines += ["", f"The old protocol's choice on the reported split: best over last epoch by "
                      f"{statistics.mean(peeked):+.4f} on average (largest {max(peeked):+.4f}) over {len(peeked)} strategies."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="append", required=True, metavar="NAME=COMMIT",
                        help="a published table and the commit whose runs.jsonl holds its old-protocol records")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md")
    args = parser.parse_args()
    pairs = [spec.split("=", 1) for spec in args.table]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        sys.exit("error: --table takes NAME=COMMIT, e.g. --table minilm-sst2=31d2991")
    command = "python benchmarks/protocol_change.py " + " ".join(f"--table {s}" for s in args.table) + f" --out {args.out}"
    text = "\n".join([f"# The comparison protocol, old against new\n\nCommand: `{command}`\n", __doc__.split("\n\n")[2], "",
                      *(table_text(name, commit) for name, commit in pairs)])
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
