"""What each strategy generated for the same prompts, side by side: the half of a comparison of
generating strategies (instruction tuning, summarization) that scores cannot show. `peftkit
report` writes it as generations.md from the predictions.jsonl each run saved.

A comparison keeps each run under `<out>/runs/<strategy>-seed<k>/`; a published table, whose
runs/ is not committed, keeps a row's generations beside runs.jsonl as
`<strategy>-predictions.jsonl`. Both are read; a row's lowest seed speaks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.compare import run_directory
from peftkit.run import PREDICTIONS

PROMPT_CHARS = 700  # longer prompts (a Dolly context, an abstract) are cut on the page; predictions.jsonl keeps them


def predictions_file(runs_dir: Path, strategy: str, seed: int) -> Path | None:
    """The generations of one row: its run's own file, else a published copy."""
    for path in (run_directory(runs_dir, strategy, seed) / PREDICTIONS, runs_dir / f"{strategy}-{PREDICTIONS}"):
        if path.is_file():
            return path
    return None


def read_generations(path: Path) -> dict[str, dict]:
    """Each prompt's line of a predictions.jsonl, by prompt."""
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {line["prompt"]: line for line in lines}


def side_by_side(runs_dir: Path, records: list[dict], strategies: list[str], count: int) -> str | None:
    """Markdown: the first `count` prompts that every row with generations answered (in the
    order the first row's file lists them), each with its reference and every row's generation,
    in `strategies`' order. None when no row saved generations, or `count` is 0."""
    seeds = {}
    for record in records:
        if record.get("status") == "ok" and record["strategy"] in strategies:
            seeds[record["strategy"]] = min(record["seed"], seeds.get(record["strategy"], record["seed"]))
    files = {s: predictions_file(runs_dir, s, seeds[s]) for s in strategies if s in seeds}
    generated = {s: read_generations(path) for s, path in files.items() if path is not None}
    if count <= 0 or not generated:
        return None
    order = list(generated)
    shared = [p for p in generated[order[0]] if all(p in g for g in generated.values())][:count]
    lines = [f"# What each strategy generated: {len(shared)} validation prompts", "",
             f"Each row's generation (lowest seed) for the same prompts: {', '.join(order)}.", ""]
    for number, prompt in enumerate(shared, 1):
        shown = prompt if len(prompt) <= PROMPT_CHARS else prompt[:PROMPT_CHARS] + " [...]"
        reference = generated[order[0]][prompt]["reference"]
        lines += [f"## Prompt {number}", "", _quoted(shown), "", f"**reference**: {_one_line(reference)}  "]
        lines += [f"**{strategy}**: {_one_line(generated[strategy][prompt]['generated'])}  " for strategy in order]
        lines.append("")
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines())


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(nothing)"
