"""Checkpoints and exact resume: a run killed after a checkpoint and resumed ends with the same
weights as one never interrupted (classification and instruction tuning); checkpoints are
complete or absent, rotated, and never resumed with other options or replaced unasked."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from peftkit.checkpoints import PROGRESS, checkpoint_root, complete_checkpoints, record_options, save_atomically
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.run import train

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def run_killed_after_first_checkpoint(command: list[str], output_dir: Path) -> None:
    """Start a training run and SIGKILL it as soon as its first checkpoint is in place."""
    process = subprocess.Popen(command + ["--output-dir", str(output_dir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    root = checkpoint_root(output_dir)
    while process.poll() is None:
        if complete_checkpoints(root):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "the run finished before its first checkpoint could be interrupted"
    assert not (output_dir / "run.json").exists()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = list(run_dir.rglob("*.safetensors"))
    assert len(files) == 1
    return load_file(files[0])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classification", "sft"])
def test_a_killed_run_resumes_to_the_same_final_weights(tmp_path, data_dir, kind):
    options = {"classification": {"model": "tiny-bert", "task": "sst2", "strategy": "full", "max_train_samples": 240,
                                  "batch_size": 16},
               "sft": {"model": "tiny-llama", "task": "sst2-chat", "strategy": "lora", "max_train_samples": 64,
                       "batch_size": 8, "chat_template": TEMPLATE, "max_new_tokens": 2}}[kind]
    options |= {"data_dir": str(data_dir), "max_eval_samples": 8, "epochs": 3}
    train({**options, "output_dir": str(tmp_path / "whole")})  # never interrupted (the seed fixes everything)
    flags = [f"{k}={v}" for k, v in options.items()]
    command = [sys.executable, "-m", "peftkit", "train", *[arg for flag in flags for arg in ("--set", flag)]]
    run_killed_after_first_checkpoint(command, tmp_path / "cut")
    last = complete_checkpoints(checkpoint_root(tmp_path / "cut"))[-1]
    progress = json.loads((last / PROGRESS).read_text())
    assert progress["train_time_s"] > 0 and progress["memory"]["peak_memory_bytes"] > 0 and progress["processes"] == 1
    # what the killed process had reached carries into the record: its time is added, its peak a floor
    (last / PROGRESS).write_text(json.dumps({"train_time_s": 1000.0, "memory": {"peak_memory_bytes": 2**40}, "processes": 1}))
    resumed = subprocess.run(command + ["--output-dir", str(tmp_path / "cut"), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    record = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert record["resumed_from_step"] > 0 and record["training_processes"] == 2
    assert 1000 < record["train_time_s"] < 1000 + json.loads((tmp_path / "whole" / "run.json").read_text())["train_time_s"] * 5
    assert record["peak_memory_bytes"] == 2**40
    assert record["metrics"] == json.loads((tmp_path / "whole" / "run.json").read_text())["metrics"]
    assert record["eval_history"] == json.loads((tmp_path / "whole" / "run.json").read_text())["eval_history"]
    assert not checkpoint_root(tmp_path / "cut").exists()  # a finished run keeps no checkpoints


def small(tmp_path, data_dir, **changes):
    config = {"model": "tiny-bert", "task": "sst2", "strategy": "lora", "data_dir": str(data_dir), "max_train_samples": 32,
              "max_eval_samples": 16, "epochs": 1, "select": "last", "output_dir": str(tmp_path / "run")}
    return {**config, **changes}


def test_resume_and_overwrite_rules(tmp_path, data_dir):
    with pytest.raises(PeftkitError, match="--resume: no complete checkpoint in .*run.checkpoints: nothing to resume"):
        train(small(tmp_path, data_dir, resume=True))
    root = checkpoint_root(tmp_path / "run")
    record_options(make_config(small(tmp_path, data_dir, learning_rate=0.1)), tmp_path / "run", "abc123")
    (root / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(PeftkitError, match="an interrupted run left checkpoints in .*: pass --resume to continue it"):
        train(small(tmp_path, data_dir))
    with pytest.raises(PeftkitError, match=r"--resume: the checkpoints in .* were made with other options \(learning_rate\)"):
        train(small(tmp_path, data_dir, resume=True))
    with pytest.raises(PeftkitError, match="resume continues an interrupted run and overwrite starts over"):
        train(small(tmp_path, data_dir, resume=True, overwrite=True))
    result = train(small(tmp_path, data_dir, overwrite=True))  # starts over: the stale checkpoints go
    assert result.record.resumed_from_step is None and not root.exists()


def test_checkpoints_are_renamed_into_place_complete_and_rotated(tmp_path):
    seen = []

    def fake_save():
        # Trainer writes checkpoint-<step> under args.output_dir: the staging folder, never the root
        seen.append(trainer.args.output_dir)
        folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        folder.mkdir(parents=True)
        (folder / "weights").write_text("w")

    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path), should_save=True), keep_checkpoints=2,
                              state=SimpleNamespace(global_step=0), accelerator=SimpleNamespace(wait_for_everyone=lambda: None))
    selection = SimpleNamespace(state_dict=lambda: {"best": 0.5})
    for step in (10, 20, 30):
        trainer.state.global_step = step
        save_atomically(trainer, fake_save, selection)
    assert all(Path(p).name == ".partial" for p in seen) and trainer.args.output_dir == str(tmp_path)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    assert torch.load(tmp_path / "checkpoint-30" / "peftkit-selection.pt") == {"best": 0.5}
    (tmp_path / ".partial" / "checkpoint-40").mkdir(parents=True)  # a save killed half way
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]


def test_progress_counts_the_work_before_training_once():
    """A resumed process adds its own training time to what its checkpoint had reached, keeps the
    highest peak of every measure, and does not count again the cached features it reloads."""
    from peftkit.checkpoints import NO_PROGRESS
    from peftkit.trainer import Timed

    def trainer(prior, peak):
        return SimpleNamespace(_started=time.perf_counter(), prior=prior, setup_seconds=5.0, eval_seconds=0.0,
                               checkpoint_seconds=0.0, memory=SimpleNamespace(stop=lambda: {"peak_memory_bytes": peak}))

    first = Timed.progress(trainer(NO_PROGRESS, 3))
    assert 5.0 <= first["train_time_s"] < 6.0 and first["memory"] == {"peak_memory_bytes": 3} and first["processes"] == 1
    resumed = Timed.progress(trainer({"train_time_s": 100.0, "memory": {"peak_memory_bytes": 7}, "processes": 1}, 3))
    assert 100.0 <= resumed["train_time_s"] < 101.0 and resumed["memory"] == {"peak_memory_bytes": 7}
    assert resumed["processes"] == 2


@pytest.mark.slow
def test_ctrl_c_prints_the_command_that_resumes_and_it_does(tmp_path, data_dir):
    """SIGINT after the first checkpoint: exit 130, no traceback, and one line whose command
    (the same flags, --resume added) finishes the run."""
    out = tmp_path / "run"
    flags = ["--model", "tiny-bert", "--task", "sst2", "--strategy", "full", "--data-dir", str(data_dir),
             "--max-train-samples", "240", "--max-eval-samples", "8", "--batch-size", "16", "--epochs", "3",
             "--output-dir", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "peftkit", "train", *flags], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not complete_checkpoints(checkpoint_root(out)):
        time.sleep(0.02)
    while process.poll() is None:  # Ctrl-C, pressed again until the run stops (a library may hold one back)
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    hint = next(line for line in stderr.splitlines() if line.startswith("interrupted:"))  # on a line of its own
    command = hint.split("continue with: ", 1)[1]
    assert command.startswith("peftkit train ") and command.endswith(" --resume")
    arguments = shlex.split(command)[1:]
    resumed = subprocess.run([sys.executable, "-m", "peftkit", *arguments], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] > 0
