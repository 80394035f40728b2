"""The typed run record (peftkit.record): old records read through its migrations and write
back unchanged, a damaged one is refused in one line naming its file, and what a training run
writes reads back as the same record, byte for byte."""

from __future__ import annotations

import json

import pytest

from peftkit.compare import RUNS_FILE, append_run, parse_runs, read_runs
from peftkit.errors import PeftkitError
from peftkit.outputs import FILES_KEY
from peftkit.record import RUN_RECORD, CellRecord, RunRecord, read_cell, read_record

# benchmarks/results/minilm-sst2/runs.jsonl, its first line (the config, versions, data,
# histories and estimate trimmed; every key of the line kept)
SST2_LINE = {
    "strategy": "partial", "seed": 0, "recipe": "recipes/minilm-sst2-partial.yaml",
    "command": "peftkit compare --model minilm --task sst2 --strategies partial,full --seeds 0,1,2 --recipe-dir recipes",
    "finished": "2026-12-07T02:29:55+00:00", "status": "ok", "error": None,
    "config": {"model": "minilm", "task": "sst2", "strategy": {"name": "partial", "layer_lr_decay": 1.0, "head_lr": None,
                                                               "trainable_layers": 3, "layers": None,
                                                               "train_embeddings": False},
               "pooling": "mean", "max_length": 128, "epochs": 4.0, "learning_rate": 0.0002, "batch_size": 32,
               "select": "best", "selection_fraction": 0.1, "metric_for_best_model": "accuracy", "seed": 0,
               "precision": "fp32", "dtype": "fp32", "cache_features": True, "resume": False,
               "output_dir": "/work/main/benchmarks/tables/minilm-sst2/runs/partial-seed0"},
    "provenance": {"commit": "429d97a12f3dc52777f5054b2cf1cf013f74d494", "dirty": False, "config_hash": "ee87c3cda4dc9a2b"},
    "task_kind": "classification", "learning_rate": 0.0002,
    "versions": {"python": "3.11.7", "peftkit": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.25.0"},
    "device": "cpu (AMD EPYC, AVX512, 2 threads)", "precision": {"weights": "fp32", "compute": "fp32"}, "processes": 1,
    "data": {"train_examples": 7200, "selection_examples": 800, "validation_examples": 872, "test_examples": 0,
             "label_names": ["negative", "positive"], "text_columns": ["sentence"], "validation_in_train": 0,
             "truncated_examples": {"train": 0, "selection": 0, "validation": 0}, "train_tokens_per_epoch": 95512,
             "longest_train_example": 62, "longest_validation_example": 60, "cached_feature_rows": 8000},
    "metrics": {"loss": 0.3881864547729492, "accuracy": 0.8658256880733946, "macro_f1": 0.865747825823779,
                "mcc": 0.7315526428205977},
    "test_metrics": None, "selection": {"select": "best", "metric": "accuracy", "on": "held-out slice of the training data"},
    "cached_features": False, "cached_bottom_layers": 0, "frozen_features": None, "best_epoch": 4.0,
    "eval_history": [{"epoch": 1.0, "loss": 0.3584350347518921, "accuracy": 0.86125, "macro_f1": 0.8588179180412576,
                      "mcc": 0.7184369975432564},
                     {"epoch": 2.0, "loss": 0.34871336817741394, "accuracy": 0.86, "macro_f1": 0.8553121124431583,
                      "mcc": 0.7195776186434814}],
    "train_loss_history": [{"epoch": 1.0, "loss": 0.421033935546875}, {"epoch": 2.0, "loss": 0.2886266072591146}],
    "epochs_trained": 4.0, "train_time_s": 215.64385501200013, "resumed_from_step": None, "training_processes": 1,
    "trainable_params": 5472002, "total_params": 22713986, "trainable_percent": 24.090892721339177,
    "peak_memory_bytes": 521723904, "samples_per_s": 133.5535389978877, "tokens_per_s": 1771.6618912175347,
    "saved_as": "trained-tensors", "size_on_disk_bytes": 22605935,
    "estimate": {"total_bytes": 550260256, "trainable_params": 5472002},
}

# a run.json from before task kinds, provenance, the held-out selection, precision and a
# run-level pooling (benchmarks/results/minilm-rte/runs.jsonl at 8b55dfa, its first line's
# run record, trimmed): its strategy kept the pooling, its config no dtype, precision auto
OLD_RECORD = {
    "config": {"model": "minilm", "task": "rte", "strategy": {"name": "full", "pooling": "mean", "layer_lr_decay": 1.0,
                                                              "head_lr": None},
               "max_length": 128, "epochs": 5.0, "learning_rate": 3e-05, "batch_size": 16, "seed": 0,
               "metric_for_best_model": "accuracy", "precision": "auto",
               "output_dir": "benchmarks/results/minilm-rte/runs/full-seed0"},
    "learning_rate": 3e-05,
    "versions": {"python": "3.11.7", "peftkit": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0"},
    "device": "cpu (x86_64, 2 threads)",
    "data": {"train_examples": 2490, "validation_examples": 277, "label_names": ["entailment", "not_entailment"],
             "text_columns": ["sentence1", "sentence2"], "train_tokens_per_epoch": 167121, "longest_train_example": 128,
             "longest_validation_example": 128},
    "metrics": {"loss": 0.8239488005638123, "accuracy": 0.592057761732852, "macro_f1": 0.5833699370416218,
                "mcc": 0.17659107295899037},
    "cached_features": False, "cached_bottom_layers": 0, "best_epoch": 4.0,
    "eval_history": [{"epoch": 1.0, "loss": 0.6877052783966064, "accuracy": 0.5379061371841155}],
    "epochs_trained": 5.0, "trainable_params": 22713986, "total_params": 22713986, "trainable_percent": 100.0,
    "peak_memory_bytes": 1257795584, "train_time_s": 557.2470836419966, "samples_per_s": 22.34197426145437,
    "tokens_per_s": 1499.5233255214926, "saved_as": "whole-model", "size_on_disk_bytes": 91580990,
}


def run_json(**changes):
    """A complete run.json of today's (SST2_LINE's run record), with `changes`."""
    record = {k: v for k, v in SST2_LINE.items() if k not in CellRecord.model_fields}
    return {**record, **changes}


def test_a_published_line_reads_as_a_typed_record_and_writes_back_unchanged():
    cell = read_cell(SST2_LINE, "line 1")
    assert cell.key == "partial/seed0" and cell.status == "ok" and cell.estimate["total_bytes"] == 550260256
    run = cell.run
    assert run.metrics["accuracy"] == 0.8658256880733946 and run.data["text_columns"] == ["sentence"]
    assert run.selection.metric == "accuracy" and run.provenance.config_hash == "ee87c3cda4dc9a2b"
    assert run.trained_precision() == {"dtype": "fp32", "precision": "fp32"}
    assert run.config_values() == run.config  # pooling already a run setting: nothing to migrate
    assert json.dumps(cell.line()) == json.dumps(SST2_LINE)  # the same keys, values and order
    assert run.peak_memory_reserved_bytes is None and "peak_memory_reserved_bytes" not in cell.line()  # a CPU run


def test_an_old_record_reads_through_the_migrations(tmp_path):
    from peftkit.resolve import config_from_record

    (tmp_path / RUN_RECORD).write_text(json.dumps(OLD_RECORD, indent=2) + "\n")
    record = read_record(tmp_path)
    assert record.task_kind == "classification" and record.provenance is None and record.selection is None
    assert record.processes == 1 and record.train_loss_history == [] and record.files is None
    config = record.config_values()
    assert config["pooling"] == "mean" and "pooling" not in config["strategy"]  # moved up from the strategy
    assert record.trained_precision() == {"dtype": "fp32", "precision": "fp32"}  # auto on a CPU, then
    assert record.dump() == OLD_RECORD and "pooling" not in record.config  # read, not rewritten
    reloaded = config_from_record(record)
    assert reloaded.pooling == "mean" and (reloaded.dtype, reloaded.precision) == ("fp32", "fp32")
    lora = RunRecord.model_validate({**OLD_RECORD, "config": {"model": "minilm", "task": "sst2",
                                                              "strategy": {"name": "lora", "r": 8}}})
    assert lora.config_values()["pooling"] == "model"  # it read the model its own way
    on_a_gpu = RunRecord.model_validate({**OLD_RECORD, "device": "NVIDIA H200"})
    assert on_a_gpu.trained_precision() == {}  # auto there resolves as it did


@pytest.mark.parametrize("change, expected", [
    ({"acuracy": 0.9}, "unknown field 'acuracy'"),
    ({"train_time_s": "fast"}, "'train_time_s': input should be a valid number, got \"fast\""),
    ({"trainable_params": "12"}, "'trainable_params': input should be a valid integer, got \"12\""),
    ({"precision": {"weights": "bf16"}}, "no 'precision.compute'"),
    ({"selection": {"select": "best", "metric": "accuracy", "on": "x", "when": 1}}, "unknown field 'selection.when'"),
])
def test_a_damaged_record_is_refused_in_one_line_naming_the_file(tmp_path, change, expected):
    (tmp_path / RUN_RECORD).write_text(json.dumps(run_json(**change)))
    with pytest.raises(PeftkitError) as refused:
        read_record(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / RUN_RECORD) in message and expected in message, message
    missing = {k: v for k, v in run_json().items() if k != "metrics"}
    (tmp_path / RUN_RECORD).write_text(json.dumps(missing))
    with pytest.raises(PeftkitError, match="no 'metrics'"):
        read_record(tmp_path)


def test_a_damaged_compare_line_is_refused_naming_its_line_and_a_cut_one_skipped(tmp_path):
    failed = {"strategy": "lora", "seed": 0, "status": "failed", "error": "error: no", "estimate": {"error": "x"}}
    (tmp_path / RUNS_FILE).write_text(json.dumps(failed) + "\n" + json.dumps({**SST2_LINE, "acuracy": 1}) + "\n")
    with pytest.raises(PeftkitError, match=rf"{RUNS_FILE} line 2 is not a peftkit compare record \(unknown field "
                                           r"'acuracy'\)"):
        read_runs(tmp_path)
    with pytest.raises(PeftkitError, match="line 1 .*an ok line holds its run's record"):
        parse_runs(json.dumps({"strategy": "a", "seed": 0, "status": "ok"}))
    with pytest.raises(PeftkitError, match="line 1 .*a failed line holds no run record"):
        parse_runs(json.dumps({**SST2_LINE, "status": "failed"}))
    (tmp_path / RUNS_FILE).write_text(json.dumps(failed) + "\n" + json.dumps(SST2_LINE)[:80])
    assert list(read_runs(tmp_path)) == ["lora/seed0"]  # cut short by a kill: skipped
    append_run(tmp_path, read_cell(SST2_LINE, "here"))
    assert (tmp_path / RUNS_FILE).read_text() == json.dumps(failed) + "\n" + json.dumps(SST2_LINE) + "\n"
    assert read_runs(tmp_path)["lora/seed0"].run is None


def test_every_field_is_described_and_old_published_tables_still_read():
    from pathlib import Path

    for model in (RunRecord, CellRecord):
        assert all(field.description for field in model.model_fields.values()), model
    assert FILES_KEY in RunRecord.model_fields
    tables = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*/runs.jsonl"))
    assert tables
    for path in tables:
        text = path.read_text()
        lines = [json.dumps(record.line()) for record in parse_runs(text, path).values()]
        assert "\n".join(lines) + "\n" == text, path  # each key as it was written


def test_a_trained_record_round_trips_through_the_file(tmp_path, data_dir):
    import peftkit

    result = peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "strategy": "bitfit",
                            "max_train_samples": 32, "max_eval_samples": 16, "epochs": 1, "batch_size": 16,
                            "output_dir": tmp_path / "run"})
    text = (result.output_dir / RUN_RECORD).read_text()
    record = read_record(result.output_dir)
    assert isinstance(result.record, RunRecord) and result.record == record
    assert json.dumps(record.dump(), indent=2) + "\n" == text  # byte for byte
    written = list(json.loads(text))
    assert written == [name for name in RunRecord.model_fields if name != "peak_memory_reserved_bytes"]  # CPU
    assert record.files == sorted(p.name for p in result.output_dir.iterdir()) and RUN_RECORD in record.files
    assert record.provenance.config_hash and record.selection.select == "best" and record.processes == 1
    cell = CellRecord(strategy="bitfit", seed=0, status="ok", error=None, run=record, estimate={"total_bytes": 1})
    line = json.loads(json.dumps(cell.line()))
    assert list(line)[:5] == ["strategy", "seed", "status", "error", "config"] and list(line)[-1] == "estimate"
    assert read_cell(line, "here") == cell
