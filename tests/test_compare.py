"""The comparison harness, on a tiny model (its report: tests/report/)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from peftkit.compare import RUNS_FILE, append_run, plan, read_runs
from peftkit.errors import PeftkitError
from peftkit.record import CellRecord

SMALL = ["--set", "max_train_samples=32", "--set", "max_eval_samples=32", "--set", "epochs=1"]


def compare_command(out, data_dir, strategies="bitfit,linear-probe", seeds="0,1", *extra):
    return [sys.executable, "-m", "peftkit.cli", "compare", "--model", "tiny-bert", "--task", "sst2",
            "--strategies", strategies, "--seeds", seeds, "--data-dir", str(data_dir), "--out", str(out), *SMALL, *extra]


@pytest.mark.slow
def test_sigkill_mid_matrix_then_resume_finishes_without_repeats(tmp_path, data_dir):
    out = tmp_path / "cmp"
    proc = subprocess.Popen(compare_command(out, data_dir, seeds="0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_runs(out)) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the harness and the run it had started
    proc.wait()
    first = read_runs(out)
    assert len(first) == 1, "kill came too late to test resuming"

    subprocess.run(compare_command(out, data_dir, seeds="0"), check=True, capture_output=True)
    lines = [json.loads(line) for line in (out / RUNS_FILE).read_text().splitlines()]
    keys = [(r["strategy"], r["seed"]) for r in lines]
    assert sorted(keys) == [("bitfit", 0), ("linear-probe", 0)]
    assert all(r["status"] == "ok" for r in lines)
    for record in lines:  # the analytic estimate rides along, for the report's estimate/measured ratio
        assert record["estimate"]["total_bytes"] > 0
        assert record["estimate"]["settings"]["seq_len"] == record["data"]["longest_train_example"]
    for key, record in first.items():  # finished before the kill: kept, not re-run
        assert read_runs(out)[key].run.train_time_s == record.run.train_time_s


@pytest.mark.slow
def test_sigterm_ends_the_running_cell_with_the_harness_and_records_nothing(tmp_path, data_dir):
    out = tmp_path / "cmp"
    command = compare_command(out, data_dir, "full", "0", "--set", "epochs=500", "--set", "max_train_samples=96")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "logs" / "full-seed0.log"
    deadline = time.time() + 120
    while time.time() < deadline and "trainable params" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    cell = psutil.Process(proc.pid).children()
    assert cell and proc.poll() is None, "the cell had not started training, or had finished"
    proc.send_signal(signal.SIGTERM)  # as `kill` or `pkill -f "peftkit compare"` sends it
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not [child for child in cell if psutil.pid_exists(child.pid)]  # ended and reaped, not left training
    assert not read_runs(out)


@pytest.mark.slow
def test_a_cell_killed_after_a_checkpoint_continues_from_it(tmp_path, data_dir):
    from peftkit.checkpoints import checkpoint_root, complete_checkpoints

    out = tmp_path / "cmp"
    command = compare_command(out, data_dir, "full", "0", "--set", "epochs=3", "--set", "max_train_samples=96")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = checkpoint_root(out / "runs" / "full-seed0")
    while proc.poll() is None and not complete_checkpoints(root):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert complete_checkpoints(root) and not read_runs(out), "kill came too late to test continuing a cell"

    subprocess.run(command, check=True, capture_output=True)
    record = read_runs(out)["full/seed0"].run
    assert record.resumed_from_step > 0 and record.training_processes == 2
    assert record.epochs_trained == 3 and not root.exists()
    assert record.config["resume"] is False  # the record, and the cell's config file, retrain the cell whole
    assert "resume: false" in (out / "configs" / "full-seed0.yaml").read_text()
    log = (out / "logs" / "full-seed0.log").read_text()
    assert "resuming from" in log and "trainable params" in log.split("resuming from")[0]  # both processes' output kept


@pytest.mark.slow
def test_failed_run_is_recorded_and_retried_on_request(tmp_path, data_dir):
    out = tmp_path / "cmp"
    # target modules are only checked against the loaded model, inside the run: one failed row
    bad = [sys.executable, "-m", "peftkit.cli", "compare", "--model", "tiny-bert", "--task", "sst2", "--strategies", "lora",
           "--seeds", "0", "--data-dir", str(data_dir), "--out", str(out), *SMALL, "--set", "target_modules=[nowhere]"]
    subprocess.run(bad, capture_output=True)
    record = read_runs(out)["lora/seed0"]
    assert record.status == "failed" and record.error
    subprocess.run(bad[:-2] + ["--retry-failed"], check=True, capture_output=True)
    lines = (out / RUNS_FILE).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "ok"


def test_each_strategy_takes_its_own_recipe(tmp_path, data_dir):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny-bert-sst2-full.yaml").write_text("strategy: full\nlearning_rate: 0.00002\n")
    cells = plan("tiny-bert", "sst2", ["full", "lora"], [0], tmp_path / "o", recipes, [], data_dir)
    lr = {c.strategy: c.config.lr for c in cells}
    assert lr["full"] == 2e-5  # from its recipe
    assert lr["lora"] == 1e-3  # lora's own default, not full's recipe value


def test_labels_name_variants_of_one_strategy(tmp_path, data_dir):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny-bert-sst2-adapter-houlsby.yaml").write_text("strategy: {name: adapter, variant: houlsby}\n")
    (recipes / "tiny-bert-sst2-adapter-pfeiffer.yaml").write_text("strategy: {name: adapter, variant: pfeiffer}\n")
    cells = plan("tiny-bert", "sst2", ["adapter-houlsby", "adapter-pfeiffer"], [0], tmp_path / "o", recipes, [], data_dir)
    assert [c.config.strategy.options["variant"] for c in cells] == ["houlsby", "pfeiffer"]
    with pytest.raises(PeftkitError, match="unknown strategy 'adapter-parallel'"):
        plan("tiny-bert", "sst2", ["adapter-parallel"], [0], tmp_path / "o", recipes, [], data_dir)


def test_recipe_for_another_strategy_is_refused(tmp_path, data_dir):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny-bert-sst2-full.yaml").write_text("strategy: lora\n")
    with pytest.raises(PeftkitError, match="trains 'lora', which label 'full' does not name"):
        plan("tiny-bert", "sst2", ["full"], [0], tmp_path / "o", recipes, [], data_dir)


def test_partial_last_line_is_ignored_and_repaired(tmp_path):
    (tmp_path / RUNS_FILE).write_text('{"strategy": "a", "seed": 0, "status": "failed"}\n{"strategy": "b", "se')
    assert list(read_runs(tmp_path)) == ["a/seed0"]
    append_run(tmp_path, CellRecord(strategy="b", seed=0, status="failed"))
    assert [json.loads(x)["strategy"] for x in (tmp_path / RUNS_FILE).read_text().splitlines()] == ["a", "b"]


def fake(strategy, seed, accuracy, trainable):
    """A successful run's line as compare appends it (the report's tests and test_provenance build on
    it; `CellRecord.model_validate` reads it)."""
    return {"strategy": strategy, "seed": seed, "command": "peftkit compare --strategies full,lora",
            "finished": "2026-11-28T05:00:00", "status": "ok", "error": None,
            "config": {"model": "m", "task": "t", "pooling": "mean"}, "task_kind": "classification",
            "learning_rate": 1e-3, "versions": {"torch": "2.13.0"}, "device": "cpu (x86_64, 2 threads)",
            "data": {"train_examples": 100}, "metrics": {"accuracy": accuracy},
            "selection": {"select": "best", "metric": "accuracy", "on": "held-out slice of the training data"},
            "best_epoch": 1.0, "epochs_trained": 1.0, "train_time_s": 10.0, "trainable_params": trainable,
            "total_params": 10_000, "trainable_percent": trainable / 1e4, "peak_memory_bytes": 2**30,
            "samples_per_s": 5.0, "tokens_per_s": 50.0, "saved_as": "adapter", "size_on_disk_bytes": 2**20,
            "estimate": {"total_bytes": 2**29}}


def test_comparison_runs_fix_the_allocator_policy_plain_runs_keep_glibcs(tmp_path, data_dir):
    """Published peaks follow memory in use (a fixed 1 MB mmap threshold); a plain run is fast."""
    from peftkit.resolve import make_config

    cells = plan("tiny-bert", "sst2", ["lora"], [0], tmp_path, None, [], data_dir)
    assert cells[0].config.cpu_mmap_threshold_kb == 1024
    assert plan("tiny-bert", "sst2", ["lora"], [0], tmp_path, None, ["cpu_mmap_threshold_kb=0"], data_dir)[0].config.cpu_mmap_threshold_kb == 0
    assert make_config({}).cpu_mmap_threshold_kb == 0
