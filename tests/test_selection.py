"""The selection protocol: the checkpoint is chosen on a slice held out from the training
data (or not chosen: select=last); the validation and test splits are scored once, at the end."""

from __future__ import annotations

import json
import shutil

import pytest

import peftkit
from peftkit.resolve import make_config
from peftkit.tasks import load_data
from peftkit.errors import PeftkitError

BASE = {"model": "tiny-bert", "task": "sst2", "max_train_samples": 64, "max_eval_samples": 32, "batch_size": 16}


def held_out(data_dir, seed):
    config = make_config({**BASE, "data_dir": data_dir, "seed": seed, "max_train_samples": 400})
    data = load_data(config)
    data.train = data.train.add_column("row", list(range(len(data.train))))
    config.task_kind.hold_out_selection(data, config)
    return data


def test_selection_slice_never_overlaps_training_and_keeps_label_shares(data_dir):
    data = held_out(data_dir, seed=0)
    train_rows, selection_rows = set(data.train["row"]), set(data.selection["row"])
    assert not train_rows & selection_rows and train_rows | selection_rows == set(range(400))
    assert len(selection_rows) == 40
    share = sum(data.train["labels"]) / len(data.train)
    assert abs(sum(data.selection["labels"]) / 40 - share) <= 1 / 40  # stratified: the same positive share


def test_selection_slice_is_fixed_by_the_seed(data_dir):
    assert held_out(data_dir, 0).selection["row"] == held_out(data_dir, 0).selection["row"]
    assert held_out(data_dir, 0).selection["row"] != held_out(data_dir, 1).selection["row"]


def test_select_last_evaluates_nothing_before_the_end(tmp_path, data_dir):
    record = peftkit.train({**BASE, "data_dir": data_dir, "strategy": "bitfit", "epochs": 2, "select": "last",
                            "output_dir": tmp_path / "run"}).record
    assert record.eval_history == [] and record.best_epoch is None
    assert record.data["selection_examples"] == 0 and record.data["train_examples"] == 64
    assert record.selection.on == "final weights" and "accuracy" in record.metrics


def test_a_test_split_is_scored_once_at_the_end(tmp_path, data_dir):
    own = tmp_path / "data" / "sst2"
    own.mkdir(parents=True)
    for split in ("train", "validation"):
        shutil.copy(data_dir / "sst2" / f"{split}.jsonl", own / f"{split}.jsonl")
    rows = (data_dir / "sst2" / "validation.jsonl").read_text().splitlines()[-20:]
    (own / "test.jsonl").write_text("\n".join(rows) + "\n")
    record = peftkit.train({**BASE, "data_dir": tmp_path / "data", "strategy": "bitfit", "epochs": 1,
                            "output_dir": tmp_path / "run"}).record
    assert record.data["test_examples"] == 20
    assert set(record.test_metrics) == set(record.metrics) and 0 <= record.test_metrics["accuracy"] <= 1


def test_early_stopping_needs_a_selection_slice():
    with pytest.raises(PeftkitError, match="early_stopping_patience needs select=best"):
        make_config({**BASE, "select": "last", "early_stopping_patience": 2})


def test_too_little_data_to_hold_out_is_one_line(tmp_path, jsonl):
    path = jsonl("two.jsonl", [{"text": "only", "label": 1}, {"text": "these", "label": 0}])
    with pytest.raises(PeftkitError, match="cannot hold out 10% of 2 training examples"):
        peftkit.train({"model": "tiny-bert", "train_file": path, "validation_file": path, "output_dir": tmp_path / "o"})
