"""A malformed line of a JSON Lines file is named in one line (split, file, line number, the
parser's message, the line's start) for every task kind, since data.py reads every file."""

from __future__ import annotations

import re

import pytest

from peftkit.resolve import make_config
from peftkit.tasks import load_data
from peftkit.errors import PeftkitError

GOOD = '{"sentence": "fine", "label": 1}\n{"sentence": "bad", "label": 0}\n'


def refusal(config: dict) -> str:
    with pytest.raises(PeftkitError) as refused:
        load_data(make_config(config))
    return str(refused.value)


@pytest.mark.parametrize("task,columns", [("classification", {"text_columns": ["sentence"]}),
                                          ("sft", {"prompt_column": "sentence", "completion_column": "label"})])
def test_a_line_that_is_not_json_is_named_with_its_line(tmp_path, task, columns):
    bad = tmp_path / "train.jsonl"
    bad.write_text(GOOD + '{"sentence": "a", "label" 1}\n')
    good = tmp_path / "validation.jsonl"
    good.write_text(GOOD)
    message = refusal({"task": task, "train_file": bad, "validation_file": good, **columns})
    assert message == f"train file {bad} line 3 is not JSON (Expecting ':' delimiter): '{{\"sentence\": \"a\", \"label\" 1}}'"


def test_the_validation_split_and_a_long_line_are_cut_to_its_start(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text(GOOD)
    bad = tmp_path / "validation.jsonl"
    bad.write_text('{"sentence": "' + "very " * 30 + '", "label": 1\n')  # no closing brace
    message = refusal({"train_file": good, "validation_file": bad})
    assert re.fullmatch(rf"validation file {re.escape(str(bad))} line 1 is not JSON \(Expecting ',' delimiter\): "
                        r"'\{\"sentence\": \"(very ){5}v'\.\.\.", message), message


@pytest.mark.parametrize("line,kind", [('["fine", 1]', "an array"), ('"fine"', "a string"), ("1", "a number")])
def test_a_line_that_is_json_but_not_an_object_is_named(tmp_path, line, kind):
    bad = tmp_path / "train.jsonl"
    bad.write_text(GOOD + line + "\n")
    message = refusal({"train_file": bad, "validation_file": bad, "text_columns": ["sentence"]})
    assert message == (f"train file {bad} line 3 is not a JSON object ({kind}): {line!r}; "
                       "each line must be one {...} example")


def test_blank_lines_and_a_byte_order_mark_stay_allowed(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\n\n  \n", 1).encode() + b"\n")
    data = load_data(make_config({"train_file": path, "validation_file": path, "text_columns": ["sentence"]}))
    assert len(data.train) == 2
