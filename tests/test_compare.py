"""The comparison harness and its report, on a tiny model."""

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
from peftkit.report import aggregate, pareto, write_report

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
        assert read_runs(out)[key]["train_time_s"] == record["train_time_s"]


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
    record = read_runs(out)["full/seed0"]
    assert record["status"] == "ok" and record["resumed_from_step"] > 0 and record["training_processes"] == 2
    assert record["epochs_trained"] == 3 and not root.exists()
    assert record["config"]["resume"] is False  # the record, and the cell's config file, retrain the cell whole
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
    assert record["status"] == "failed" and record["error"]
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
    (tmp_path / RUNS_FILE).write_text('{"strategy": "a", "seed": 0, "status": "ok"}\n{"strategy": "b", "se')
    assert list(read_runs(tmp_path)) == ["a/seed0"]
    append_run(tmp_path, {"strategy": "b", "seed": 0, "status": "ok"})
    assert [json.loads(x)["strategy"] for x in (tmp_path / RUNS_FILE).read_text().splitlines()] == ["a", "b"]


def fake(strategy, seed, accuracy, trainable):
    return {"strategy": strategy, "seed": seed, "status": "ok", "metrics": {"accuracy": accuracy},
            "trainable_params": trainable, "trainable_percent": trainable / 1e4, "peak_memory_bytes": 2**30,
            "train_time_s": 10.0, "samples_per_s": 5.0, "tokens_per_s": 50.0, "size_on_disk_bytes": 2**20,
            "config": {"model": "m", "task": "t", "pooling": "mean"}, "estimate": {"total_bytes": 2**29},
            "device": "cpu (x86_64, 2 threads)", "task_kind": "classification",
            "selection": {"select": "best", "metric": "accuracy", "on": "held-out slice of the training data"},
            "versions": {"torch": "2.13.0"}, "command": "peftkit compare --strategies full,lora", "finished": "2026-11-28T05:00:00"}


def test_report_aggregates_seeds_and_finds_the_pareto_frontier(tmp_path):
    records = [fake("full", 0, 0.90, 10000), fake("full", 1, 0.88, 10000), fake("lora", 0, 0.86, 100),
               fake("probe", 0, 0.70, 10), fake("bad", 0, 0.60, 1000),
               {"strategy": "prefix-tuning", "seed": 0, "status": "failed", "error": "error: prefix-tuning cannot train X"}]
    ordered = aggregate(records, "accuracy")
    assert [r.strategy for r in ordered] == ["full", "lora", "probe", "bad"]  # best first
    rows = {r.strategy: r for r in ordered}
    assert rows["lora"].metric_std is None and rows["lora"].metric_text == "0.8600"  # one seed: no made-up spread
    assert rows["full"].n == 2 and rows["full"].metric_mean == pytest.approx(0.89)
    assert rows["full"].metric_std == pytest.approx(0.0141421, abs=1e-6)
    assert rows["full"].estimate_ratio == pytest.approx(0.5)
    assert [r.strategy for r in pareto(list(rows.values()))] == ["probe", "lora", "full"]
    by_loss = aggregate([fake("big", 0, 1.2, 1000), fake("small", 0, 1.5, 10), fake("worse", 0, 1.9, 100)],
                        "accuracy", greater_is_better=False)  # read the values as a loss: lower is better
    assert [r.strategy for r in pareto(by_loss, greater_is_better=False)] == ["small", "big"]
    for record in records:
        append_run(tmp_path, record)
    paths = write_report(tmp_path)
    assert {p.name for p in paths} >= {"results.md", "results.csv", "results.json", "results.html", "metric_vs_params.png"}
    text = (tmp_path / "results.md").read_text()
    assert "0.8900 ± 0.0141" in text and "| 0.8600 | 1 |" in text
    assert "Command: `peftkit compare --strategies full,lora`" in text and "Date: 2026-11-28" in text
    assert "Checkpoint: best accuracy on a held-out slice of the training data; the validation split scored once" in text
    assert "Head input: mean pooling of the last hidden states (pooling: mean)" in text  # one reading, shown
    assert "- prefix-tuning (seed 0): error: prefix-tuning cannot train X" in text  # refusals are reported too
    assert "data:image/png;base64," in (tmp_path / "results.html").read_text()
    assert "accuracy (mean ± std)" in text


def test_an_open_ended_instruction_table_leads_with_rouge_l(tmp_path):
    for strategy, scores in (("none", (0.0, 0.19, 10.9)), ("lora", (0.01, 0.25, 6.0)), ("full", (0.02, 0.22, 5.5))):
        record = fake(strategy, 0, 0.0, 100)
        record.update(task_kind="sft", config={"model": "tiny-llama", "task": "dolly"},
                      metrics=dict(zip(("exact_match", "rouge_l", "perplexity"), scores)))
        append_run(tmp_path, record)
    write_report(tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| rouge_l (one seed) | exact_match | perplexity |" in text
    assert [row["strategy"] for row in json.loads((tmp_path / "results.json").read_text())] == ["lora", "full", "none"]
    assert not (tmp_path / "generations.md").exists()  # no run saved generations


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
        append_run(tmp_path, record)
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
        append_run(tmp_path, record)
        (tmp_path / "runs" / f"{strategy}-seed0").mkdir(parents=True)
        (tmp_path / "runs" / f"{strategy}-seed0" / "predictions.jsonl").write_text(json.dumps(
            {"id": "q1", "question": "Who wrote it?", "prediction": f"{strategy}'s span", "answers": ["Ann", "Ann", "A. B."]}))
    write_report(tmp_path)
    text = (tmp_path / "generations.md").read_text()
    assert "> Who wrote it?" in text and "**reference**: Ann | A. B." in text  # repeated references once
    assert text.index("**full**: full's span") < text.index("**lora**: lora's span")
    classification = tmp_path / "classification"
    classification.mkdir()
    append_run(classification, fake("full", 0, 0.9, 100))
    (classification / "runs" / "full-seed0").mkdir(parents=True)
    (classification / "runs" / "full-seed0" / "predictions.jsonl").write_text('{"prompt": "p", "generated": "g"}\n')
    write_report(classification)
    assert not (classification / "generations.md").exists()


def test_a_one_seed_table_says_so_and_its_legend_sits_below_the_points(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftkit.report import _legend_below, markdown, plots

    rows = aggregate([fake("full", 0, 0.90, 10000), fake("lora", 0, 0.86, 100)], "accuracy")
    text = markdown(rows, "accuracy", "t")
    assert "accuracy (one seed)" in text and "±" not in text
    assert (tmp_path / "metric_vs_params.png") in plots(rows, "accuracy", tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1], [1], "o", label="a point")
    _legend_below(ax)
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0  # outside the axes: it hides nothing


def test_point_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftkit.report import label_offsets

    fig, ax = plt.subplots(figsize=(8, 5))
    points = [(2.2e5, 0.861), (2.3e5, 0.8605), (3.3e5, 0.8647), (1e7, 0.80)]
    labels = ["adapter-houlsby", "adapter-pfeiffer", "qlora", "full"]
    ax.scatter(*zip(*points))
    ax.set_xscale("log")
    offsets = label_offsets(ax, points, labels)
    plt.close(fig)
    assert offsets[3] == (6.0, 4.0) and offsets[2] == (6.0, 4.0)  # labels with room stay beside their point
    assert offsets[1][1] < offsets[0][1]  # the lower of two crowded labels moves down, clear of the other


def test_comparison_runs_fix_the_allocator_policy_plain_runs_keep_glibcs(tmp_path, data_dir):
    """Published peaks follow memory in use (a fixed 1 MB mmap threshold); a plain run is fast."""
    from peftkit.config import make_config

    cells = plan("tiny-bert", "sst2", ["lora"], [0], tmp_path, None, [], data_dir)
    assert cells[0].config.cpu_mmap_threshold_kb == 1024
    assert plan("tiny-bert", "sst2", ["lora"], [0], tmp_path, None, ["cpu_mmap_threshold_kb=0"], data_dir)[0].config.cpu_mmap_threshold_kb == 0
    assert make_config({}).cpu_mmap_threshold_kb == 0
