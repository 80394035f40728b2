"""generations.md: every row's answers to the same inputs, side by side, where the task saves
answers (peftkit.report.generations)."""

from __future__ import annotations

import json

from peftkit.compare import append_run
from peftkit.record import CellRecord
from peftkit.report.write import write_report
from test_compare import fake


def test_the_report_sets_each_rows_generations_for_the_same_prompts_side_by_side(tmp_path):
    """A run's own predictions.jsonl (under runs/) and a published copy beside runs.jsonl are
    both read; only prompts every row answered are shown, rows in the table's order."""
    def predictions(answers):
        return "".join(json.dumps({"prompt": p, "reference": f"ref {p}", "references": [f"ref {p}"], "generated": g})
                       + "\n" for p, g in answers)

    for strategy, seed, rouge in (("lora", 1, 0.1), ("lora", 0, 0.1), ("adapter", 0, 0.05), ("full", 0, 0.2)):
        record = fake(strategy, seed, 0.0, 100)
        record.update(task_kind="sft", config={"model": "tiny-llama", "task": "dolly"},
                      metrics={"exact_match": 0.0, "rouge_l": rouge, "perplexity": 5.0})
        append_run(tmp_path, CellRecord.model_validate(record))
    (tmp_path / "runs" / "lora-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "lora-seed0" / "predictions.jsonl").write_text(predictions(
        [("Name a fruit.", "An apple."), ("Only lora saw this.", "x"), ("Why?", "Because\nof <b>it</b>.")]))
    (tmp_path / "runs" / "lora-seed1").mkdir()
    (tmp_path / "runs" / "lora-seed1" / "predictions.jsonl").write_text(predictions([("Name a fruit.", "seed 1")]))
    (tmp_path / "adapter-predictions.jsonl").write_text(predictions([("Why?", "I do not know."), ("Name a fruit.", "")]))
    write_report(tmp_path, samples=5)
    text = (tmp_path / "generations.md").read_text()
    assert "# What each strategy answered: 2 validation inputs" in text and "No answers saved: full." in text
    assert "Only lora saw this" not in text and "seed 1" not in text  # a row's lowest seed speaks for it
    first, second = text.split("## Input 1")[1].split("## Input 2")
    assert "> Name a fruit." in first and "**reference**: ref Name a fruit." in first
    assert first.index("**lora**: An apple.") < first.index("**adapter**: (nothing)")  # the table's order, not names'
    assert "**lora**: Because of &lt;b&gt;it&lt;/b&gt;." in second  # one line, markup shown as text
    write_report(tmp_path, samples=1)
    assert "# What each strategy answered: 1 validation inputs" in (tmp_path / "generations.md").read_text()
    write_report(tmp_path, samples=0)
    assert not (tmp_path / "generations.md").exists()  # none asked for: an earlier one is not left behind


def test_question_answering_rows_are_set_side_by_side_by_their_own_keys(tmp_path):
    """Each task names the keys of its predictions (QA: question, answers, prediction); a task
    that saves none (classification) gets no generations.md."""
    for strategy, f1 in (("full", 0.7), ("lora", 0.6)):
        record = fake(strategy, 0, 0.0, 100)
        record.update(task_kind="qa", config={"model": "tiny-bert", "task": "squad"},
                      metrics={"f1": f1, "exact_match": f1 - 0.1, "loss": 1.0})
        append_run(tmp_path, CellRecord.model_validate(record))
        (tmp_path / "runs" / f"{strategy}-seed0").mkdir(parents=True)
        (tmp_path / "runs" / f"{strategy}-seed0" / "predictions.jsonl").write_text(json.dumps(
            {"id": "q1", "question": "Who wrote it?", "prediction": f"{strategy}'s span", "answers": ["Ann", "Ann", "A. B."]}))
    write_report(tmp_path)
    text = (tmp_path / "generations.md").read_text()
    assert "> Who wrote it?" in text and "**reference**: Ann | A. B." in text  # repeated references once
    assert text.index("**full**: full's span") < text.index("**lora**: lora's span")
    classification = tmp_path / "classification"
    classification.mkdir()
    append_run(classification, CellRecord.model_validate(fake("full", 0, 0.9, 100)))
    (classification / "runs" / "full-seed0").mkdir(parents=True)
    (classification / "runs" / "full-seed0" / "predictions.jsonl").write_text('{"prompt": "p", "generated": "g"}\n')
    write_report(classification)
    assert not (classification / "generations.md").exists()
