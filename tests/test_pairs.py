"""Preference pairs (peftkit.tasks.pairs): both of TRL's forms, the user's column names, the
built-in sst2-pref made from sst2-chat, every refusal in one line, and TRL's tokenization."""

from __future__ import annotations

import pytest

from peftkit.errors import PeftkitError
from peftkit.models import load_tokenizer, resolve_model
from peftkit.resolve import make_config
from peftkit.tasks import DATASETS
from peftkit.tasks.pairs import load_pairs, tokenize_pair
from test_sft import CHATML

USER = [{"role": "user", "content": "Is this review positive or negative?\n\ngreat fun"}]
CHOSEN = [{"role": "assistant", "content": "positive"}]
REJECTED = [{"role": "assistant", "content": "negative"}]


def pairs_config(tmp_path, jsonl, rows, validation=None, **options):
    train = jsonl("train.jsonl", rows)
    valid = jsonl("validation.jsonl", validation or rows)
    return make_config({"model": "tiny-llama", "task": "dpo", "train_file": train, "validation_file": valid,
                        "output_dir": tmp_path / "out", **options})


def test_conversational_and_standard_pairs_load(tmp_path, jsonl):
    data = load_pairs(pairs_config(tmp_path, jsonl, [{"prompt": USER, "chosen": CHOSEN, "rejected": REJECTED}]), None)
    assert data.info["data_format"] == "conversational" and data.train[0]["chosen"] == CHOSEN
    data = load_pairs(pairs_config(tmp_path, jsonl, [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}]), None)
    assert data.info["data_format"] == "standard" and data.train[0]["rejected"] == " 5"


def test_the_users_column_names_are_read(tmp_path, jsonl):
    rows = [{"q": "Q: 2+2?", "good": " 4", "bad": " 5"}]
    data = load_pairs(pairs_config(tmp_path, jsonl, rows, prompt_column="q", chosen_column="good",
                                   rejected_column="bad"), None)
    assert data.train[0] == {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}


def test_identical_replies_are_counted_and_said(tmp_path, jsonl, capsys):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "b"}, {"prompt": "a", "chosen": "b", "rejected": "c"}]
    data = load_pairs(pairs_config(tmp_path, jsonl, rows), None)
    assert data.info["identical_pairs"] == {"train": 1, "validation": 1}
    assert "1 train pairs have a chosen reply identical to the rejected one" in capsys.readouterr().out


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "rejected"),
    ({"prompt": USER + CHOSEN, "chosen": CHOSEN, "rejected": REJECTED}, "ends with an assistant turn"),
    ({"prompt": USER, "chosen": "positive", "rejected": REJECTED}, "chosen must be one assistant message"),
    ({"prompt": USER, "chosen": CHOSEN, "rejected": [{"role": "user", "content": "x"}]}, "rejected must be one"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "must be text or a list of chat messages"),
])
def test_bad_pairs_are_refused_in_one_line(tmp_path, jsonl, row, message):
    with pytest.raises(PeftkitError, match=message) as err:
        load_pairs(pairs_config(tmp_path, jsonl, [row]), None)
    assert "\n" not in str(err.value)


def test_a_mixed_file_is_refused_with_its_row(tmp_path, jsonl):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": USER, "chosen": CHOSEN, "rejected": REJECTED}]
    with pytest.raises(PeftkitError, match="train row 1: prompt, chosen and rejected must all be text"):
        load_pairs(pairs_config(tmp_path, jsonl, rows), None)


def test_sst2_pref_pairs_the_right_word_against_the_other(data_dir, tmp_path):
    config = make_config({"model": "tiny-llama", "task": "sst2-pref", "data_dir": data_dir, "max_train_samples": 20,
                          "max_eval_samples": 5, "output_dir": tmp_path / "out"})
    data = load_pairs(config, DATASETS["sst2-pref"])
    for row in data.train:
        assert {row["chosen"][0]["content"], row["rejected"][0]["content"]} == {"positive", "negative"}
        assert row["prompt"][-1]["role"] == "user"
    assert len(data.train) == 20 and len(data.validation) == 5


def test_pairs_tokenize_as_trl_does():
    """The ids peftkit scores are TRL's own: its DPO trainer's tokenization of the same pair."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    pair = {"prompt": USER, "chosen": CHOSEN, "rejected": REJECTED}
    ours = tokenize_pair(tokenizer, pair)
    trainer = object.__new__(DPOTrainer)
    trainer._tokenizer = tokenizer
    theirs = DPOTrainer._prepare_dataset(trainer, Dataset.from_list([pair]), tokenizer,
                                         DPOConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True, bf16=False), "train")[0]
    assert {k: theirs[k] for k in ours} == ours
    assert tokenizer.decode(ours["chosen_ids"]).startswith("positive")


def test_a_standard_pair_ends_with_the_end_of_text_token():
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    ids = tokenize_pair(tokenizer, {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"})
    assert ids["chosen_ids"][-1] == ids["rejected_ids"][-1] == tokenizer.eos_token_id


def test_kind_and_data_set_of_the_same_form(tmp_path, data_dir):
    config = make_config({"model": "tiny-llama", "task": "kto:hh-rlhf-harmless", "data_dir": data_dir,
                          "output_dir": tmp_path / "o", "chat_template": CHATML})
    assert config.task_kind.name == "kto"
    with pytest.raises(PeftkitError, match="dpo cannot read data set sst2, made for classification"):
        make_config({"model": "tiny-llama", "task": "dpo:sst2", "output_dir": tmp_path / "o"})
