"""Every command checks its own arguments, and the run record it reads, before torch or any
weights load: a wrong argument answers in one line, exit code 2, in a fresh process under
1.5 s on this machine (asserted at 3 s for a noisy one)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest


def fake_run(directory, task, task_kind, **config):
    """A run directory with only a record: what the commands read before anything loads."""
    from test_record import run_json

    directory.mkdir(parents=True)
    record = run_json(config={"model": "minilm", "task": task, "strategy": {"name": "lora"}, **config},
                      task_kind=task_kind, data={"text_columns": ["sentence"]}, metrics={})
    (directory / "run.json").write_text(json.dumps(record))
    return directory


CASES = {
    "train": (lambda tmp: ["train", "--strategy", "nope"], "unknown strategy 'nope'"),
    "train (data)": (lambda tmp: ["train", "--model", "tiny-bert", "--task", "sst2", "--data-dir", tmp],
                     "no train file at"),
    "eval": (lambda tmp: ["eval", "--run", tmp], "is not a peftkit run: no readable run.json"),
    "predict": (lambda tmp: ["predict", "--run", fake_run(tmp / "qa", "squad", "qa"), "Who wrote it?"],
                "this qa run reads 2 text(s) per input (question, context), got 1"),
    "generate": (lambda tmp: ["generate", "--run", fake_run(tmp / "cls", "sst2", "classification"), "hi"],
                 "is a classification run, which does not generate text"),
    "merge": (lambda tmp: ["merge", "--run", fake_run(tmp / "mean", "sst2", "classification", pooling="mean"),
                           "--output", tmp / "merged"], "pooling mean"),
    "compare": (lambda tmp: ["compare", "--strategies", "lora", "--seeds", "a", "--out", tmp / "cmp"],
                "--seeds takes comma-separated integers"),
    "report": (lambda tmp: ["report", tmp], "has no successful runs"),
    "estimate": (lambda tmp: ["estimate", "--model", "minilm", "--strategy", "nope"], "unknown strategy 'nope'"),
}


@pytest.mark.parametrize("command", CASES)
def test_a_wrong_argument_answers_fast_in_a_fresh_process(command, tmp_path):
    arguments, expected = CASES[command]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "peftkit", *map(str, arguments(tmp_path))], capture_output=True,
                          text=True, timeout=60)
    elapsed = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
    assert elapsed < 3.0, f"{command} took {elapsed:.2f} s"


def test_train_with_no_model_or_task_refuses_instead_of_picking_a_hub_job(tmp_path):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "peftkit", "train"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 2 and "peftkit train needs a --model and a --task" in done.stderr
    assert time.perf_counter() - start < 3.0 and not (tmp_path / "runs").exists()


def test_predict_on_an_sft_run_points_at_generate(tmp_path):
    from test_cli import assert_clean_failure, invoke

    run = fake_run(tmp_path / "chat", "sst2-chat", "sft", model="smollm2-135m")
    assert_clean_failure(invoke("predict", "--run", run, "hello"),
                         f"{run} is a run of task sft, which answers chat prompts with generated text: use `peftkit generate",
                         tmp_path / "nothing")


def test_a_recipe_that_is_not_yaml_is_named_with_its_line_and_column(tmp_path):
    from test_cli import assert_clean_failure, invoke

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-bert\ntask: sst2\n  strategy: lora\n")
    assert_clean_failure(invoke("train", "--recipe", recipe),
                         f"recipe {recipe} is not valid YAML at line 3, column 11: mapping values are not allowed here",
                         tmp_path / "nothing")


@pytest.mark.parametrize("task,shape", [("classification", "batch 32 x 128 tokens"), ("sft", "batch 32 x 1024 tokens")])
def test_estimate_takes_trains_defaults(task, shape):
    from test_cli import invoke

    result = invoke("estimate", "--model", "tiny-llama", "--strategy", "lora", "--task", task, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert shape in result.stdout


def test_validating_a_whole_config_imports_no_torch():
    """`pooling: auto` reads the checkpoint's declaration and `dtype` is checked against
    `precision` from the options alone: a valid config costs no library, so every later
    argument check still answers before torch loads."""
    code = ("import sys; from peftkit.resolve import make_config; make_config({'model': 'minilm', 'task': 'sst2', "
            "'dtype': 'bf16'}); print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
