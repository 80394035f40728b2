"""What each strategy answered to the same inputs, side by side: the half of a comparison that
scores cannot show (instruction tuning, summarization, extractive QA). `peftkit report` writes
it as generations.md from the predictions.jsonl each run saved, whose keys its task names
(`Task.prediction_fields`).

A comparison keeps each run under `<out>/runs/<strategy>-seed<k>/`; a published table, whose
runs/ is not committed, keeps the file of a row's lowest seed beside runs.jsonl as
`<strategy>-predictions.jsonl`. Both are read; a row's lowest seed speaks for it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from peftkit.compare import run_directory
from peftkit.record import CellRecord
from peftkit.tasks.base import PREDICTIONS

INPUT_CHARS = 700  # longer inputs (a Dolly context, an abstract) are cut on the page; predictions.jsonl keeps them


def predictions_file(runs_dir: Path, strategy: str, seed: int) -> Path | None:
    """The answers of one row: its run's own file, else a published copy."""
    for path in (run_directory(runs_dir, strategy, seed) / PREDICTIONS, runs_dir / f"{strategy}-{PREDICTIONS}"):
        if path.is_file():
            return path
    return None


def read_answers(path: Path, fields: tuple[str, str, str]) -> dict[str, tuple[list[str], str]]:
    """Each input's (references, answer) in a predictions.jsonl, by input; a repeated input
    keeps its last line, in every row alike."""
    given, references, answer = fields
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {line[given]: (list(line[references]), line[answer]) for line in lines}


def side_by_side(runs_dir: Path, records: list[CellRecord], strategies: list[str], count: int,
                 fields: tuple[str, str, str] | None) -> str | None:
    """Markdown: the first `count` inputs that every row with answers answered (in the order the
    first row's file lists them), each with its references and every row's answer, rows in
    `strategies`' order. None when the task saves no answers (`fields` None), `count` is 0, or
    no input was answered by every row that saved answers."""
    if fields is None or count <= 0:
        return None
    seeds: dict[str, int] = {}
    for record in records:
        if record.status == "ok" and record.strategy in strategies:
            seeds[record.strategy] = min(record.seed, seeds.get(record.strategy, record.seed))
    files = {s: predictions_file(runs_dir, s, seeds[s]) for s in strategies if s in seeds}
    answers = {s: read_answers(path, fields) for s, path in files.items() if path is not None}
    if not answers:
        return None
    rows = list(answers)
    shared = [given for given in answers[rows[0]] if all(given in a for a in answers.values())][:count]
    if not shared:
        return None
    missing = [s for s, path in files.items() if path is None]
    lines = [f"# What each strategy answered: {len(shared)} validation inputs", "",
             f"Each row's answer (its lowest seed) to the same inputs: {', '.join(rows)}."
             + (f" No answers saved: {', '.join(missing)}." if missing else ""), ""]
    for number, given in enumerate(shared, 1):
        shown = given if len(given) <= INPUT_CHARS else given[:INPUT_CHARS] + " [...]"
        references = list(dict.fromkeys(_one_line(r) for r in answers[rows[0]][given][0]))
        lines += [f"## Input {number}", "", _quoted(shown), "", f"**reference**: {' | '.join(references)}  "]
        lines += [f"**{row}**: {_one_line(answers[row][given][1])}  " for row in rows]
        lines.append("")
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return "\n".join("> " + html.escape(line, quote=False) for line in text.splitlines())


def _one_line(text: str) -> str:
    """The text on one line, with markup shown as text (a model's `<div>` is not rendered)."""
    return html.escape(" ".join(text.split()), quote=False) or "(nothing)"
