"""Using a finished run: re-evaluate it on its validation split, or ask it about new input.
Both go through the run's task, so they work the same for every task kind. The run's record
and the inputs are checked first, before any library or weight loads (torch and the run's
loading are imported inside the functions that need them, for that reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.record import RunRecord, read_record
from peftkit.resolve import config_from_record
from peftkit.tasks import TASKS, resolve_task


def evaluate_run(run_dir: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """Reload a run and recompute its validation metrics with the run's own data settings
    (the data is read and checked before the weights load)."""
    config = config_from_record(read_record(run_dir), data_dir=data_dir)
    task, dataset = resolve_task(config.task_name)
    data = task.load_data(config, dataset)
    from peftkit.loading import load_run
    from peftkit.trainer import autocast_for

    config, model, tokenizer, record = load_run(run_dir, data_dir=data_dir)
    with autocast_for(config):
        result = task.evaluate(model, config, task.prepare(data, tokenizer, config), tokenizer)
    return {"metrics": result.metrics, "recorded": record.metrics}


def predict_inputs(run_dir: Path, texts: list[str] | None, path: Path | None) -> list[list[str]]:
    """`predict`'s inputs for the run, checked against what its task reads: one input's
    texts given on the command line, or the lines of a JSON Lines `path`; a run whose task
    answers in generated text is sent to `peftkit generate`."""
    if bool(texts) == bool(path):
        raise PeftkitError("give one input as arguments or many with --file FILE.jsonl, not both and not neither")
    record = read_record(run_dir)
    kind = known_task_kind(record, run_dir)
    if not TASKS[kind].predicts:
        raise PeftkitError(f"{run_dir} is a run of task {kind}, which answers chat prompts with generated text: use "
                           f"`peftkit generate --run {run_dir} \"PROMPT\"`")
    fields = TASKS[kind].input_fields(record)
    if path is not None:
        return read_inputs(path, fields)
    if len(texts) != len(fields):
        wanted = " ".join(f'"{field.upper()}"' for field in fields)
        raise PeftkitError(f"this {kind} run reads {len(fields)} text(s) per input ({', '.join(fields)}), got "
                           f"{len(texts)}: peftkit predict --run {run_dir} {wanted}")
    return [list(texts)]


def predict(run_dir: Path, examples: list[list[str]]) -> list[str]:
    """The run's answer for each input (its texts), one line each (a label and its probability, ...)."""
    from peftkit.loading import load_run
    from peftkit.trainer import autocast_for

    config, model, tokenizer, record = load_run(run_dir)
    with autocast_for(config):
        return config.task_kind.predict(model, tokenizer, record, examples, config)


def read_inputs(path: Path, fields: list[str]) -> list[list[str]]:
    """A JSON Lines file of inputs for `predict`: each line an object with the run's input
    `fields` (its text columns, ...), checked before weights load."""
    inputs = []
    for number, row in _json_lines(path):
        if not isinstance(row, dict) or any(not isinstance(row.get(f), str) for f in fields):
            raise PeftkitError(f"--file {path} line {number}: each line needs text field(s) {', '.join(fields)}")
        inputs.append([row[f] for f in fields])
    if not inputs:
        raise PeftkitError(f"--file {path} has no inputs")
    return inputs


def check_generates(run_dir: Path) -> RunRecord:
    """The record of a run whose task generates text, or one line saying what to use instead."""
    record = read_record(run_dir)
    kind = known_task_kind(record, run_dir)
    if not TASKS[kind].generates_text:
        raise PeftkitError(f"{run_dir} is a {kind} run, which does not generate text: use `peftkit predict`")
    return record


def generate_answers(run_dir: Path, conversations: list[list[dict[str, str]]],
                     max_new_tokens: int | None = None) -> tuple[list[Any], int]:
    """Greedy answers of an instruction-tuned run, one `Reply` per conversation (each ends
    with a user turn), and the `max_new_tokens` they were generated under."""
    check_generates(run_dir)  # before any weights load
    from peftkit.loading import load_run
    from peftkit.trainer import autocast_for

    config, model, tokenizer, record = load_run(run_dir)
    limit = max_new_tokens or config.max_new_tokens
    with autocast_for(config):
        return config.task_kind.answer(model, tokenizer, conversations, limit, config.eval_batch_size), limit


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from JSON Lines: each line a {"prompt": text} or a {"messages": [...]}."""
    conversations = []
    for number, row in _json_lines(path):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            conversations.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            conversations.append(row["messages"])
        else:
            raise PeftkitError(f"--file {path} line {number}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
    if not conversations:
        raise PeftkitError(f"--file {path} has no prompts")
    return conversations


def known_task_kind(record: RunRecord, run_dir: Path) -> str:
    """The run's task kind, one this peftkit knows, or one line saying it does not."""
    kind = record.task_kind
    if kind not in TASKS:
        raise PeftkitError(f"{run_dir} was trained for task kind '{kind}', which this peftkit does not have "
                           f"({', '.join(TASKS)}): use the peftkit version that trained it")
    return kind


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSON Lines file, or one line
    naming the file, the line and its first characters."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PeftkitError(f"cannot read --file {path}: {err}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise PeftkitError(f"--file {path} line {number} is not JSON ({err.msg}): {line[:40]!r}") from None
    return rows
