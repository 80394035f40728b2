"""The command line: bad input gets one line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftkit.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, expected, output_dir):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_unknown_strategy(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "lroa", "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "unknown strategy 'lroa' (did you mean 'lora'?)", out)


def test_unknown_strategy_option(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "lora", "--set", "rank=4", "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "strategy 'lora' has no option 'rank'", out)


def test_typo_in_recipe(tmp_path, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-bert\nstrategy: lora\nlearnin_rate: 0.001\n")
    out = tmp_path / "out"
    result = invoke("train", "--recipe", recipe, "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "unknown option 'learnin_rate' (did you mean 'learning_rate'?)", out)


def test_typo_of_a_run_option_in_set_is_not_called_a_strategy_option(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "lora", "--set", "lerning_rate=0.1",
                    "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "unknown option 'lerning_rate' (did you mean 'learning_rate'?)", out)


def test_output_dir_naming_a_file(tmp_path, data_dir):
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "lora", "--data-dir", data_dir, "--output-dir", taken)
    assert_clean_failure(result, f"{taken} is a file, not a directory", tmp_path / "nothing")
    assert taken.read_text() == "keep me"


def test_data_without_label_column(tmp_path, jsonl):
    rows = [{"text": "fine", "target": 1}]
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-bert", "--train-file", jsonl("t.jsonl", rows),
                    "--validation-file", jsonl("v.jsonl", rows), "--output-dir", out)
    assert_clean_failure(result, "no column 'label'", out)


def test_label_outside_label_set(tmp_path, jsonl):
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-bert",
                    "--train-file", jsonl("t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]),
                    "--validation-file", jsonl("v.jsonl", [{"text": "c", "label": "meh"}]), "--output-dir", out)
    assert_clean_failure(result, "label 'meh' is not in the label set", out)


def test_model_path_that_does_not_exist(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", tmp_path / "nope", "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "does not exist", out)


def test_non_empty_output_dir_is_kept(tmp_path, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--data-dir", data_dir, "--output-dir", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_eval_of_a_directory_that_is_not_a_run(tmp_path):
    result = invoke("eval", "--run", tmp_path)
    assert result.exit_code == 2 and "not a peftkit run" in result.stderr


def test_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", "--strategy", "nope", "--output-dir", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown strategy 'nope'")
    assert not (tmp_path / "o").exists()


def test_strategies_lists_the_registry(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the table takes the terminal's width: count lines at a known one
    result = invoke("strategies")
    assert result.exit_code == 0
    for name in ("full", "partial", "linear-probe", "bitfit", "lora", "dora", "qlora"):
        assert name in result.stdout
    # the ~40 peft:<method> rows are summarised in one line unless asked for
    assert "peft:loha " not in result.stdout and "--all-peft lists them" in result.stdout
    assert len(result.stdout.splitlines()) < 60
    everything = invoke("strategies", "--all-peft")
    assert "peft:loha" in everything.stdout and "--all-peft lists them" not in everything.stdout


def test_train_eval_predict_through_the_cli(tmp_path, data_dir):
    out = tmp_path / "run"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "bitfit", "--data-dir", data_dir,
                    "--max-train-samples", 32, "--max-eval-samples", 32, "--epochs", 1, "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert "trainable params:" in result.stdout
    accuracy = json.loads((out / "run.json").read_text())["metrics"]["accuracy"]
    evaluated = invoke("eval", "--run", out)
    assert f"accuracy: {accuracy:.4f}" in evaluated.stdout
    predicted = invoke("predict", "--run", out, "what a film")
    assert predicted.exit_code == 0 and predicted.stdout.split("\t")[0] in ("negative", "positive")
    # a batch in one process: one JSON line per input, the same answer as one at a time
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"sentence": "what a film"}\n{"sentence": "dull and far too long"}\n')
    batch = invoke("predict", "--run", out, "--file", inputs)
    assert batch.exit_code == 0, batch.output
    rows = [json.loads(line) for line in batch.stdout.splitlines() if line.startswith("{")]
    assert [r["input"] for r in rows] == [["what a film"], ["dull and far too long"]]
    assert rows[0]["prediction"] == predicted.stdout.strip()
    inputs.write_text('{"text": "no sentence field"}\n')
    assert_clean_failure(invoke("predict", "--run", out, "--file", inputs), "each line needs text field(s) sentence",
                         tmp_path / "nothing")


def test_version_and_python_dash_m():
    assert invoke("--version").stdout.strip() == "peftkit 0.1.0"
    done = subprocess.run([sys.executable, "-m", "peftkit", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "peftkit 0.1.0"


LARGE_RECIPES = sorted(p for family in ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b")
                       for p in (Path(__file__).parents[1] / "recipes").glob(f"{family}-*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", LARGE_RECIPES, ids=lambda p: p.stem)
def test_large_llm_recipes_validate_with_dry_run(recipe, tmp_path):
    """Each 7-8B recipe validates and is estimated from its model's config alone (the hub
    config, committed under tests/configs/); the qlora ones fit one 24 GB GPU. No weights load."""
    family = next(f for f in ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b") if recipe.stem.startswith(f))
    config = Path(__file__).parent / "configs" / f"{family}.json"
    result = invoke("train", "--recipe", recipe, "--model", config, "--dry-run", "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "dtype: bf16" in result.output and "gradient_checkpointing: true" in result.output
    fits = re.search(r"smallest GPU it fits: (\d+) GB", result.output)
    assert fits, result.output
    if recipe.stem.endswith("qlora"):
        assert "paged-adamw-8bit" in result.output and int(fits.group(1)) <= 24
    assert not (tmp_path / "run").exists()


def test_dry_run_on_cpu_prints_the_estimate_without_training(tmp_path):
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "lora", "--dry-run", "--device", "cpu",
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "weights fp32" in result.output and "total" in result.output and "smallest GPU" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_python_api_prints_no_library_noise(tmp_path, data_dir):
    """A qlora run through the Python API: peftkit's lines and Trainer's progress, no load
    report for the new head, no bitsandbytes kernel hint, no deprecation warnings."""
    script = (f"import peftkit; peftkit.train({{'model': 'tiny-bert', 'task': 'sst2', 'data_dir': {str(data_dir)!r}, "
              f"'max_train_samples': 16, 'max_eval_samples': 8, 'epochs': 1, 'strategy': 'qlora', "
              f"'gradient_checkpointing': True, 'output_dir': {str(tmp_path / 'run')!r}}})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    assert not [line for line in lines if "Warning" in line or "LOAD REPORT" in line or "kernels" in line], lines


@pytest.mark.parametrize("arguments", [["train", "--strategy", "nope"], ["--help"], ["train", "--set", "lerning_rate=1"]])
def test_bad_input_and_help_answer_fast_in_a_fresh_process(arguments):
    """Option schemas import neither torch nor PEFT: a typo or --help answers in well under
    1.5 s on this machine (asserted at 3 s for a noisy one)."""
    import time

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "peftkit", *arguments], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"{arguments} took {elapsed:.2f} s"
    assert done.returncode in (0, 2) and "Traceback" not in done.stderr


def test_the_option_schemas_import_neither_torch_nor_peft():
    code = "import sys, peftkit.options, peftkit.resolve; print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_dry_run_device_must_be_cuda_or_cpu(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "lora", "--dry-run", "--device", "tpu", "--output-dir", out)
    assert_clean_failure(result, "--device must be cuda or cpu, got 'tpu'", out)
