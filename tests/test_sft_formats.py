"""Instruction-tuning data formats (task `sft`): OpenAI messages, ShareGPT conversations,
Alpaca instruction/input/output and prompt/completion, detected from the columns, said in
one line and recorded; roles outside a format refused with their row."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.models import load_tokenizer, resolve_model
from peftkit.tasks import resolve_task
from peftkit.tasks.sft import SUMMARY_PROMPT
from test_sft import CHATML

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
          {"instruction": "Name a colour.", "input": None, "output": "blue"}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}, {"from": "user", "value": "Bye"},
                               {"from": "assistant", "value": "Goodbye"}]},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]


def load(jsonl, rows, validation=None, **options):
    """The sft task's data for a training file of `rows` (and a validation file, else the same)."""
    train = jsonl("train.jsonl", rows)
    dev = jsonl("validation.jsonl", validation) if validation is not None else train
    task, dataset = resolve_task("sft")
    return task.load_data(make_config({"task": "sft", "train_file": train, "validation_file": dev, **options}), dataset)


def user_turns(data):
    return [row["messages"][0]["content"] for row in data.train]


def test_alpaca_joins_a_non_empty_input_after_the_instruction(jsonl, capsys):
    data = load(jsonl, ALPACA)
    assert user_turns(data) == ["Add 2 and 3.", "Translate to French.\n\ncat", "Name a colour."]
    assert [row["messages"][1] for row in data.train] == [{"role": "assistant", "content": a} for a in ("5", "chat", "blue")]
    assert data.info["data_format"] == "alpaca"
    assert data.info["columns"] == {"instruction": "instruction", "input": "input", "output": "output"}
    assert "data: alpaca (instruction + input + output; input joined after the instruction)\n" in capsys.readouterr().out


def test_alpaca_without_an_input_column(jsonl, capsys):
    data = load(jsonl, [{k: v for k, v in row.items() if k != "input"} for row in ALPACA])
    assert user_turns(data) == ["Add 2 and 3.", "Translate to French.", "Name a colour."]
    assert data.info["columns"] == {"instruction": "instruction", "output": "output"}
    assert "data: alpaca (instruction + output; no input column)\n" in capsys.readouterr().out


def test_an_instruction_column_mapped_by_hand_keeps_alpacas_input(jsonl, capsys):
    """--set prompt_column=instruction --set completion_column=output used to drop `input`."""
    data = load(jsonl, ALPACA, prompt_column="instruction", completion_column="output")
    assert user_turns(data)[1] == "Translate to French.\n\ncat"
    assert data.info["data_format"] == "alpaca"
    out = capsys.readouterr().out
    assert ("data: alpaca (instruction + input + output; input joined after the instruction; prompt_column=instruction, "
            "and the data's 'input' column is joined too, not dropped)\n") in out


def test_other_prompt_columns_stay_prompt_completion(jsonl):
    data = load(jsonl, [{"q": "1+1?", "a": "2", "input": "ignored"}], prompt_column="q", completion_column="a")
    assert data.info["data_format"] == "prompt-completion" and user_turns(data) == ["1+1?"]


def test_alpaca_prompt_template_places_instruction_and_input(jsonl, capsys):
    template = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    data = load(jsonl, ALPACA[:2], prompt_template=template)
    assert user_turns(data) == ["### Instruction:\nAdd 2 and 3.\n\n### Input:\n\n\n### Response:",
                                "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:"]
    assert "data: alpaca (instruction + input + output; prompt_template places the instruction and input)" in \
        capsys.readouterr().out
    # {prompt} takes the two joined; text that holds a placeholder's name is left as it is
    data = load(jsonl, [{"instruction": "Say {input}.", "input": "hi", "output": "hi"}], prompt_template="Q: {prompt}")
    assert user_turns(data) == ["Q: Say {input}.\n\nhi"]


@pytest.mark.parametrize("rows,template,message", [
    (ALPACA, "{instruction}", "prompt_template must place the instruction and the input"),
    ([{"prompt": "p", "completion": "c"}], "{instruction}", r"must mark the prompt with \{prompt\} \(it has \{instruction\}\)"),
    ([{"prompt": "p", "completion": "c"}], "Answer briefly.", r"must mark the prompt with \{prompt\} \(it has no placeholder\)"),
    (SHAREGPT, "{prompt}", "this data has chat messages: drop it"),
])
def test_a_template_that_would_drop_part_of_the_prompt_is_refused(jsonl, rows, template, message):
    with pytest.raises(PeftkitError, match=message):
        load(jsonl, rows, prompt_template=template)


def test_sharegpt_roles_are_mapped(jsonl, capsys):
    data = load(jsonl, SHAREGPT)
    assert [m["role"] for m in data.train[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert data.train[1]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert data.info["data_format"] == "sharegpt" and data.info["columns"] == {"conversations": "conversations"}
    assert ("data: sharegpt (column 'conversations' of {from, value}; human -> user, gpt -> assistant, "
            "system -> system)\n") in capsys.readouterr().out


def test_sharegpt_in_a_column_named_by_hand(jsonl):
    data = load(jsonl, [{"chat": row["conversations"]} for row in SHAREGPT], messages_column="chat")
    assert data.info["data_format"] == "sharegpt" and data.train[1]["messages"][0]["role"] == "user"


def test_sharegpt_unknown_from_is_refused_with_its_row(jsonl):
    bad = [SHAREGPT[1], {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}]
    with pytest.raises(PeftkitError, match="^validation row 1: message 1 has from 'bot', which is not one of "
                                           "human, gpt, system, user, assistant$"):
        load(jsonl, SHAREGPT, validation=bad)


@pytest.mark.parametrize("role,hint", [("human", "ShareGPT's human/gpt are read from {from, value} turns"),
                                       ("tool", "tool turns are not trained on")])
def test_messages_with_an_unknown_role_are_refused_with_its_row(jsonl, role, hint):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": role, "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(PeftkitError) as refused:
        load(jsonl, rows)
    message = str(refused.value)
    assert message.startswith(f"train row 1: message 0 has role '{role}', which is not one of system, user, assistant")
    assert hint in message and "\n" not in message


def test_the_format_passes_through_prepare(jsonl):
    """prepare keeps TaskData.info, so the run record's data section names the format."""
    task, _ = resolve_task("sft")
    config = make_config({"task": "sft", "train_file": jsonl("t.jsonl", ALPACA), "validation_file": jsonl("v.jsonl", ALPACA),
                          "model": "tiny-llama", "chat_template": CHATML})
    prepared = task.prepare(task.load_data(config, None), load_tokenizer(resolve_model("tiny-llama")), config)
    assert prepared.info["data_format"] == "alpaca"


def first_rows(path, count):
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(count)]


@pytest.mark.parametrize("name,data_format", [("sst2-chat", "messages"), ("dolly", "messages"),
                                              ("gsm8k", "prompt-completion"), ("scitldr", "prompt-completion")])
def test_built_in_data_sets_keep_their_examples(data_dir, name, data_format):
    task, dataset = resolve_task(name)
    data = task.load_data(make_config({"task": name, "data_dir": data_dir, "max_train_samples": 3,
                                       "max_eval_samples": 2}), dataset)
    assert data.info["data_format"] == data_format
    for split, rows in (("train", data.train), ("validation", data.validation)):
        expected = []
        for raw in first_rows(data_dir / name / f"{split}.jsonl", len(rows)):
            if data_format == "messages":
                expected.append(raw["messages"])
            elif name == "gsm8k":
                expected.append([{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": raw["completion"]}])
            else:
                expected.append([{"role": "user", "content": SUMMARY_PROMPT.replace("{prompt}", raw["document"])},
                                 {"role": "assistant", "content": raw["summary"]}])
        assert rows["messages"] == expected


def test_an_alpaca_file_trains_and_the_record_names_its_format(tmp_path, jsonl):
    train = jsonl("train.jsonl", ALPACA)
    result = peftkit.train({"model": "tiny-llama", "task": "sft", "train_file": train, "validation_file": train,
                            "chat_template": CHATML, "epochs": 1, "select": "last", "strategy": "lora",
                            "max_new_tokens": 2, "max_length": 128, "output_dir": tmp_path / "run"})
    assert result.record.data["data_format"] == "alpaca"
    assert result.record.data["columns"] == {"instruction": "instruction", "input": "input", "output": "output"}
