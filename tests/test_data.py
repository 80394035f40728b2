"""Data sources: built-in tasks from a local directory, and the user's own files."""

from __future__ import annotations

import json

import pytest

from peftkit.resolve import make_config
from peftkit.tasks import load_data
from peftkit.errors import PeftkitError
from peftkit.tasks import resolve_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sst2_from_local_directory(data_dir):
    data = load_data(make_config({"task": "sst2", "data_dir": data_dir, "max_train_samples": 100}))
    assert len(data.train) == 100 and len(data.validation) == 872
    assert data.info["text_columns"] == ["sentence"] and data.info["label_names"] == ["negative", "positive"]
    assert set(data.train["labels"]) == {0, 1}


def test_rte_is_a_sentence_pair(data_dir):
    data = load_data(make_config({"task": "rte", "data_dir": data_dir}))
    assert data.info["text_columns"] == ["sentence1", "sentence2"]
    assert len(data.train) == 2490 and len(data.validation) == 277
    assert data.info["label_names"] == ["entailment", "not_entailment"]


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("PEFTKIT_DATA_DIR", str(data_dir))
    assert make_config({"task": "rte"}).data_dir == data_dir


def test_custom_csv_with_string_labels(tmp_path):
    (tmp_path / "train.csv").write_text("review,stars\ngood,pos\nbad,neg\nfine,pos\n")
    (tmp_path / "dev.csv").write_text("review,stars\nawful,neg\n")
    config = make_config({"train_file": tmp_path / "train.csv", "validation_file": tmp_path / "dev.csv",
                          "text_columns": ["review"], "label_column": "stars", "task": None})
    data = load_data(config)
    assert data.info["label_names"] == ["neg", "pos"]
    assert data.train["labels"] == [1, 0, 1] and data.validation["labels"] == [0]


def test_custom_integer_labels_keep_numeric_order(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}])
    dev = write_jsonl(tmp_path / "v.jsonl", [{"text": "c", "label": 2}])
    data = load_data(make_config({"train_file": train, "validation_file": dev}))
    assert data.info["label_names"] == ["2", "10"] and data.train["labels"] == [1, 0]


def test_missing_label_column_is_named(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "y": 1}])
    with pytest.raises(PeftkitError, match="no column 'label'.*--label-column"):
        load_data(make_config({"train_file": train, "validation_file": train}))


def test_label_outside_the_label_set(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    dev = write_jsonl(tmp_path / "v.jsonl", [{"text": "c", "label": "neutral"}])
    with pytest.raises(PeftkitError, match="validation row 0: label 'neutral' is not in the label set"):
        load_data(make_config({"train_file": train, "validation_file": dev}))


def test_missing_task_files(tmp_path):
    with pytest.raises(PeftkitError, match="no train file"):
        load_data(make_config({"task": "sst2", "data_dir": tmp_path}))


def test_unreadable_file(tmp_path):
    bad = tmp_path / "t.json"  # a .jsonl file is checked line by line first (tests/test_data_errors.py)
    bad.write_text("{not json\n")
    with pytest.raises(PeftkitError, match="cannot read train file .*t.json as json"):
        load_data(make_config({"train_file": bad, "validation_file": bad}))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"", "train file .*empty.jsonl is empty \\(0 bytes\\)"),
    ("header.csv", b"text,label\n", "train file .*header.csv has no examples \\(only a header\\?\\)"),
    ("latin1.csv", "text,label\ncaf\u00e9 cr\u00e8me,pos\n".encode("latin-1"),
     "train file .*latin1.csv is not UTF-8 \\(line 2, byte 4: b'\\\\xe9'\\): re-save it as UTF-8"),
])
def test_empty_header_only_and_non_utf8_files_are_named(tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    good = write_jsonl(tmp_path / "v.jsonl", [{"text": "fine", "label": "pos"}])
    with pytest.raises(PeftkitError, match=message):
        load_data(make_config({"train_file": bad, "validation_file": good}))


def test_unknown_task():
    with pytest.raises(PeftkitError, match="unknown task 'mnli'"):
        load_data(make_config({"task": "mnli"}))


def test_hub_failure_explains_the_local_alternative(monkeypatch):
    import datasets
    import huggingface_hub

    # offline at once (the libraries read these settings when imported, so set their constants too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.delenv("PEFTKIT_DATA_DIR", raising=False)
    with pytest.raises(PeftkitError, match="cannot download nyu-mll/glue/sst2.*--data-dir"):
        load_data(make_config({"task": "sst2"}))


@pytest.mark.parametrize("task, reported", [("conll2003", ["train", "validation", "test"]),
                                            ("sst2", ["train", "validation"]), ("gsm8k", ["train", "validation"])])
def test_a_labelled_hub_test_split_is_read_and_glues_unlabelled_one_is_not(monkeypatch, task, reported):
    """CoNLL-2003's hub test split is labelled and reported beside validation; GLUE's test
    labels are all -1, so it is left out; gsm8k has train and test only, and test validates."""
    import datasets

    from peftkit.data import read_splits

    row = {"tokens": ["EU"], "ner_tags": [3], "sentence": "fine", "label": -1, "question": "1+1?", "answer": "#### 2"}
    hub = datasets.DatasetDict({name: datasets.Dataset.from_list([row]) for name in
                                (["train", "test"] if task == "gsm8k" else ["train", "validation", "test"])})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    monkeypatch.delenv("PEFTKIT_DATA_DIR", raising=False)
    config = make_config({"task": task})
    assert sorted(read_splits(config, resolve_task(task)[1])) == sorted(reported)


def test_training_data_with_one_label_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    with pytest.raises(PeftkitError, match=r"the training data has one label only \(pos\): a classifier needs"):
        load_data(make_config({"train_file": train, "validation_file": train}))


def test_mixed_integer_and_string_labels_are_named(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])
    with pytest.raises(PeftkitError, match=r"labels mix integers and strings \(1 and .pos.\): use one type"):
        load_data(make_config({"train_file": train, "validation_file": train}))


def test_validation_examples_seen_in_training_are_counted_and_warned(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    dev = write_jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "pos"}, {"text": "c", "label": "neg"}])
    data = load_data(make_config({"train_file": train, "validation_file": dev}))
    assert data.info["validation_in_train"] == 1
    assert "warning: 1 of 2 validation examples also appear in the training data" in capsys.readouterr().err
