"""Token classification (NER): label alignment, seqeval metrics and tag encoding checked by
hand on tiny inputs; data checks; every strategy end to end on a tiny BERT; cached per-token
features equal to the model's own; and MiniLM learning CoNLL-2003 entities."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.memory.estimate import estimate_for
from peftkit.inference import evaluate_run, predict
from peftkit.models import load_for_classification, load_tokenizer, resolve_model
from peftkit.run import train
from peftkit.tasks import resolve_task
from peftkit.tasks.token_classification import PadWithLabels, align_labels, entity_scores, tag_encoding, tokenize_words

SENTENCE = "EU rejects German call to boycott British lamb ."


def test_first_sub_token_carries_the_word_label():
    # [CLS] EU re ##jects German [SEP]: words 0, 1, 1, 2
    assert align_labels([None, 0, 1, 1, 2, None], [3, 0, 5]) == [-100, 3, 0, -100, 5, -100]


def test_words_are_split_into_sub_tokens_and_aligned_with_a_real_tokenizer():
    from datasets import Dataset

    tokenizer = load_tokenizer(resolve_model("minilm"))
    data = Dataset.from_dict({"tokens": [["Blackburn", "rejects", "it"], ["a", "b", "c", "d", "e", "f"]],
                              "labels": [[1, 0, 0], [0, 2, 0, 0, 0, 0]]})
    encoded = tokenize_words(data, tokenizer, max_length=6)
    first = encoded[0]
    pieces = tokenizer.convert_ids_to_tokens(first["input_ids"])
    assert pieces[:3] == ["[CLS]", "blackburn", "rejects"] or pieces[1] == "black"
    words = tokenizer([["Blackburn", "rejects", "it"]], is_split_into_words=True).word_ids(0)
    assert first["labels"] == align_labels(words, [1, 0, 0])
    assert sum(label != -100 for label in first["labels"]) == 3  # one label per word
    second = encoded[1]  # [CLS] a b c d [SEP]: two of six words cut
    assert second["length"] == 6 and second["labels"] == [-100, 0, 2, 0, 0, -100]
    assert (first["truncated"], second["truncated"]) == (0, 1)


def test_entity_scores_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    scores = entity_scores(true, predicted)
    # entities: PER(0-1) right, LOC(3) missed and ORG(3) spurious, ORG(0) right: 2 of 3 found, 2 of 3 right
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert (scores["PER/f1"], scores["LOC/recall"], scores["ORG/precision"]) == (1.0, 0.0, 0.5)
    # conlleval rules: a run of I- tags starts an entity; a boundary error is a miss and a false alarm
    assert entity_scores([["B-PER", "I-PER"]], [["I-PER", "I-PER"]])["f1"] == 1.0
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0


def test_tag_encoding():
    assert tag_encoding(["B-PER", "O", "I-PER"], None) == (["O", "B-PER", "I-PER"], {"O": 0, "B-PER": 1, "I-PER": 2})
    assert tag_encoding([0, 2, 1], ["O", "B-X", "I-X"]) == (["O", "B-X", "I-X"], {0: 0, 1: 1, 2: 2})
    with pytest.raises(PeftkitError, match="the tags are integers and nothing names them"):
        tag_encoding([0, 1], None)
    with pytest.raises(PeftkitError, match="tag 3 has no name"):
        tag_encoding([0, 3], ["O", "B-X"])
    with pytest.raises(PeftkitError, match="mix integers and strings"):
        tag_encoding([0, "O"], None)
    with pytest.raises(PeftkitError, match="these tags are strings already"):
        tag_encoding(["O"], ["O"])


def test_padding_gives_labels_minus_100():
    tokenizer = load_tokenizer(resolve_model("minilm"))
    batch = PadWithLabels(tokenizer)([{"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "labels": [-100, 2, -100]},
                                      {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": [-100, -100], "tokens": ["x"]}])
    assert batch["labels"].tolist() == [[-100, 2, -100], [-100, -100, -100]]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_options_of_another_task_and_mean_pooling_are_refused():
    with pytest.raises(PeftkitError, match="tokens_column is an option of task 'token-classification'"):
        make_config({"task": "sst2", "tokens_column": "words"})
    with pytest.raises(PeftkitError, match="pooling=mean makes one vector per example, and task 'token-classification'"):
        make_config({"task": "conll2003", "strategy": "linear-probe", "pooling": "mean"})
    assert make_config({"task": "conll2003", "model": "minilm"}).pooling == "model"  # auto: a per-token head reads every token
    assert resolve_task("wnut17")[0].name == "token-classification"


def ner_rows(count, integer=False):
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    rows = []
    for i in range(count):
        tags = ["B-PER", "I-PER", "O", "B-LOC"] if i % 2 else ["O", "O", "B-LOC", "O"]
        rows.append({"words": ["Ann", "Lee", "visits", "Paris"] if i % 2 else ["we", "like", "Rome", "."],
                     "tags": [names.index(t) for t in tags] if integer else tags})
    return rows


def own_files(jsonl, tmp_path, **changes):
    config = {"model": "tiny-bert", "task": "token-classification", "strategy": "lora", "epochs": 1, "batch_size": 4,
              "train_file": str(jsonl("train.jsonl", ner_rows(16))), "validation_file": str(jsonl("val.jsonl", ner_rows(6))),
              "tokens_column": "words", "tags_column": "tags", "output_dir": str(tmp_path / "run"), "select": "last"}
    return {**config, **changes}


@pytest.mark.parametrize("rows,message", [
    ([{"words": ["a", "b"], "tags": ["O"]}], "train row 0: 2 words in 'words' but 1 tags in 'tags': give one tag per word"),
    ([{"words": "a b", "tags": ["O", "O"]}], "column 'words' must be a list of words"),
    ([{"text": ["a"], "tags": ["O"]}], "train data has no column 'words'"),
])
def test_bad_rows_get_one_line(jsonl, tmp_path, rows, message):
    with pytest.raises(PeftkitError, match=re.escape(message)):
        train(own_files(jsonl, tmp_path, train_file=str(jsonl("bad.jsonl", rows))))
    assert not (tmp_path / "run").exists()


def test_a_validation_tag_unseen_in_training_is_refused(jsonl, tmp_path):
    validation = jsonl("val2.jsonl", [{"words": ["x"], "tags": ["B-ORG"]}])
    with pytest.raises(PeftkitError, match="validation row 0: tag 'B-ORG' is not in the training data's tag set"):
        train(own_files(jsonl, tmp_path, validation_file=str(validation)))


def test_own_files_with_integer_tags_train_and_predict(jsonl, tmp_path):
    rows = ner_rows(16, integer=True)
    config = own_files(jsonl, tmp_path, train_file=str(jsonl("int.jsonl", rows)),
                       validation_file=str(jsonl("intval.jsonl", rows[:6])), tag_names=["O", "B-PER", "I-PER", "B-LOC"],
                       strategy="full", epochs=8, learning_rate=3e-3)
    result = train(config)
    assert result.record.data["label_names"] == ["O", "B-PER", "I-PER", "B-LOC"]
    assert result.metrics["f1"] == 1.0  # two sentence shapes, learned
    assert predict(result.output_dir, [["Ann Lee visits Paris"], ["we like Rome ."]]) == ["PER: Ann Lee; LOC: Paris", "LOC: Rome"]


@pytest.mark.parametrize("strategy", ["lora", "full", "adapter", "linear-probe", "prompt-tuning"])  # all: test_architectures
def test_every_strategy_trains_reloads_and_predicts(tmp_path, data_dir, strategy):
    result = train({"model": "tiny-bert", "task": "conll2003", "strategy": strategy, "data_dir": str(data_dir),
                    "max_train_samples": 40, "max_eval_samples": 20, "epochs": 1, "batch_size": 8,
                    "output_dir": str(tmp_path / strategy)})
    record = result.record
    assert record.task_kind == "token-classification" and record.cached_features == (strategy == "linear-probe")
    # what a linear probe caches, for the estimate: one vector per word of the 40 training sentences (with the selection slice)
    words = sum(len(json.loads(line)["tokens"]) for line in (data_dir / "conll2003" / "train.jsonl").read_text().splitlines()[:40])
    assert record.data["cached_feature_rows"] == words
    cached = estimate_for(make_config(record.config), record.dump())["terms"]["cached_features"]
    assert cached == (4 * words * 64 if strategy == "linear-probe" else 0)
    assert {"f1", "precision", "recall", "accuracy", "loss"} <= set(record.metrics)
    assert all(key.split("/")[0] in {"PER", "ORG", "LOC", "MISC"} for key in record.metrics if "/" in key)
    again = evaluate_run(result.output_dir)
    assert again["metrics"]["f1"] == pytest.approx(record.metrics["f1"], abs=1e-6)
    assert again["metrics"]["loss"] == pytest.approx(record.metrics["loss"], rel=1e-4)
    (line,) = predict(result.output_dir, [[SENTENCE]])
    assert line == "(no entities)" or re.fullmatch(r"(PER|ORG|LOC|MISC): [^;]+(; (PER|ORG|LOC|MISC): [^;]+)*", line)


def test_cached_token_features_are_the_heads_inputs_at_first_sub_tokens(data_dir):
    from peftkit.resolve import make_config as config_of
    from peftkit.caches.features import FeatureDataset, HeadOnFeatures, head_inputs

    task = resolve_task("conll2003")[0]
    config = config_of({"model": "tiny-bert", "task": "conll2003", "data_dir": str(data_dir), "max_train_samples": 12,
                        "max_eval_samples": 4})
    source = resolve_model("tiny-bert")
    tokenizer = load_tokenizer(source)
    data = task.load_data(config, resolve_task("conll2003")[1])
    prepared = task.prepare(data, tokenizer, config)
    model = load_for_classification(source, data.info["label_names"], tokenizer,
                                    auto_class="AutoModelForTokenClassification").eval()
    collate = PadWithLabels(tokenizer)
    features = FeatureDataset(head_inputs(model, prepared.train, collate, batch_size=5), prepared.train["labels"])
    head = HeadOnFeatures(model.classifier, model.config.num_labels)
    batch = features.collate([features[i] for i in range(len(features))])
    from_features = head(batch["features"])["logits"][batch["labels"] != -100]
    whole = collate([prepared.train[i] for i in range(len(prepared.train))])
    with torch.no_grad():
        logits = model(**{k: v for k, v in whole.items() if k != "labels"}).logits
    assert torch.allclose(from_features, logits[whole["labels"] != -100], atol=1e-5)
    assert len(from_features) == sum(len(tags) for tags in data.train["labels"])  # every word, once


def test_prompt_tuning_returns_logits_for_the_real_tokens_only(tmp_path, data_dir):
    from peftkit.loading import load_run

    result = train({"model": "tiny-bert", "task": "conll2003", "strategy": "prompt-tuning", "data_dir": str(data_dir),
                    "max_train_samples": 16, "max_eval_samples": 8, "epochs": 1, "output_dir": str(tmp_path / "pt")})
    _, model, tokenizer, _ = load_run(result.output_dir)
    inputs = tokenizer([SENTENCE.split()], is_split_into_words=True, return_tensors="pt")
    labels = torch.zeros_like(inputs["input_ids"])
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(out.loss)


def test_strategies_command_shows_what_applies_to_ner():
    result = CliRunner().invoke(app, ["strategies", "--task", "conll2003"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "yes" in rows["linear-probe"] and "yes" in rows["lora"] and "no:" in rows["none"]


@pytest.mark.real
def test_minilm_learns_conll2003_entities(tmp_path, data_dir):
    result = train({"model": "minilm", "task": "conll2003", "strategy": "full", "data_dir": str(data_dir),
                    "max_train_samples": 600, "max_eval_samples": 120, "epochs": 2, "batch_size": 16,
                    "learning_rate": 3e-4, "select": "last", "output_dir": str(tmp_path / "minilm")})
    metrics = result.metrics
    assert metrics["f1"] > 0.5, metrics  # untrained: ~0; the published table trains on all 14,041 sentences
    assert json.loads((result.output_dir / "run.json").read_text())["data"]["truncated_examples"]["validation"] == 0
