"""Using a finished run: re-evaluate it on its validation split, or ask it about new input.
Both go through the run's task, so they work the same for every task kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.run import load_run
from peftkit.tasks import resolve_task
from peftkit.trainer import autocast_for


def evaluate_run(run_dir: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """Reload a run and recompute its validation metrics with the run's own data settings."""
    config, model, tokenizer, record = load_run(run_dir, data_dir=data_dir)
    task, dataset = resolve_task(config.task_name)
    data = task.load_data(config, dataset)
    with autocast_for(config):
        result = task.evaluate(model, config, task.prepare(data, tokenizer, config), tokenizer)
    return {"metrics": result.metrics, "recorded": record["metrics"]}


def predict(run_dir: Path, examples: list[list[str]]) -> list[str]:
    """The run's answer for each input (its texts), one line each (a label and its probability, ...)."""
    config, model, tokenizer, record = load_run(run_dir)
    with autocast_for(config):
        return config.task_kind.predict(model, tokenizer, record, examples, config)


def read_inputs(run_dir: Path, path: Path) -> list[list[str]]:
    """A JSON Lines file of inputs for `predict`: each line an object with the run's input
    fields (its text columns; `prompt` for instruction tuning), checked before weights load."""
    import json

    from peftkit.errors import PeftkitError
    from peftkit.run import read_record
    from peftkit.tasks import TASKS

    record = read_record(run_dir)
    fields = TASKS[record.get("task_kind", "classification")].input_fields(record)
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise PeftkitError(f"cannot read --file {path}: {err}") from None
    inputs = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PeftkitError(f"--file {path} line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(f), str) for f in fields):
            raise PeftkitError(f"--file {path} line {number}: each line needs text field(s) {', '.join(fields)}")
        inputs.append([row[f] for f in fields])
    if not inputs:
        raise PeftkitError(f"--file {path} has no inputs")
    return inputs


def generate_answers(run_dir: Path, conversations: list[list[dict[str, str]]], max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of an instruction-tuned run, one per conversation (each ends with a user turn)."""
    from peftkit.errors import PeftkitError
    from peftkit.run import read_record
    from peftkit.tasks import TASKS

    kind = read_record(run_dir).get("task_kind", "classification")
    if not getattr(TASKS.get(kind), "generates_text", False):  # checked before any weights load
        raise PeftkitError(f"{run_dir} is a {kind} run, which does not generate text: use `peftkit predict`")
    config, model, tokenizer, record = load_run(run_dir)
    with autocast_for(config):
        return config.task_kind.answer(model, tokenizer, conversations, max_new_tokens or config.max_new_tokens,
                                       config.eval_batch_size)


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from JSON Lines: each line a {"prompt": text} or a {"messages": [...]}."""
    import json

    from peftkit.errors import PeftkitError

    conversations = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PeftkitError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PeftkitError(f"{path} line {number} is not JSON ({err.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            conversations.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            conversations.append(row["messages"])
        else:
            raise PeftkitError(f"{path} line {number}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
    if not conversations:
        raise PeftkitError(f"{path} has no prompts")
    return conversations
