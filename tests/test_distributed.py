"""Data-parallel training with accelerate on CPU (two gloo processes): the loss falls, only
rank 0 writes the run, every rank holds what was saved, and 2 processes equal 1 process with
twice the gradient accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.slow


def launch(config: dict, dump: Path, processes: int) -> None:
    """`accelerate launch --multi_gpu --num_processes N tests/ddp_worker.py` (on a machine
    without GPUs its ranks run on CPU with gloo: accelerate's `--cpu` launcher starts a single
    process unless mpirun is set up), or the worker alone for one process."""
    dump.mkdir(parents=True, exist_ok=True)
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else []
    command = [sys.executable, *launcher, str(WORKER), json.dumps(config, default=str), str(dump)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def saved_tensors(run_dir: Path) -> dict:
    files = list(run_dir.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def same_tensors(saved: dict, held: dict) -> bool:
    """PEFT saves adapter tensors without the adapter name (`.default`), and the trained copy
    of a head (`modules_to_save`) under the head's own name."""
    plain = {k.replace(".default", "").replace(".modules_to_save", "").removeprefix("base_model.model."): v
             for k, v in held.items()}
    saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    return saved.keys() == plain.keys() and all((saved[k] - plain[k]).abs().max() == 0 for k in saved)


@pytest.mark.parametrize("task", ["sst2-chat"])  # classification DDP: the two tests below
def test_two_processes_train_and_only_rank_0_writes(tmp_path, data_dir, task):
    model = "tiny-bert" if task == "sst2" else "tiny-llama"
    config = {"model": model, "task": task, "data_dir": data_dir, "strategy": {"name": "lora", "dropout": 0.0},
              "max_train_samples": 64 if task == "sst2" else 32, "max_eval_samples": 8, "epochs": 2, "batch_size": 8,
              "learning_rate": 1e-2,
              "select": "last", "max_new_tokens": 3, "output_dir": tmp_path / "run"}
    if task == "sst2-chat":
        from test_sft import CHATML

        config["chat_template"] = CHATML
    launch(config, tmp_path / "dump", processes=2)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["processes"] == 2
    losses = [entry["loss"] for entry in record["train_loss_history"]]
    assert len(losses) == 2 and losses[1] < losses[0]  # the training loss, over both ranks, fell
    # one run directory, written once (no second staging folder left behind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "run"]
    saved = saved_tensors(tmp_path / "run")
    for rank in (0, 1):
        assert same_tensors(saved, load_file(tmp_path / "dump" / f"rank{rank}.safetensors"))


def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path, data_dir):
    config = {"model": "tiny-llama", "task": "sst2", "data_dir": data_dir,
              "strategy": {"name": "lora", "dropout": 0.0}, "max_train_samples": 64, "max_eval_samples": 8,
              "epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "select": "last"}
    launch({**config, "output_dir": tmp_path / "two"}, tmp_path / "dump-two", processes=2)
    launch({**config, "gradient_accumulation_steps": 2, "output_dir": tmp_path / "one"}, tmp_path / "dump-one",
           processes=1)
    two, one = saved_tensors(tmp_path / "two"), saved_tensors(tmp_path / "one")
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in two) < 1e-5
    assert any((two[k] != 0).any() for k in two if "lora_B" in k)  # they trained


def test_compare_runs_each_cell_data_parallel(tmp_path, data_dir):
    from test_cli import invoke

    result = invoke("compare", "--model", "tiny-bert", "--task", "sst2", "--strategies", "lora", "--out", tmp_path / "cmp",
                    "--data-dir", data_dir, "--num-processes", "2", "--set", "max_train_samples=32",
                    "--set", "max_eval_samples=8", "--set", "epochs=1", "--set", "select=last")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "cmp" / "runs.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and record["processes"] == 2


def test_launcher_commands_and_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    from peftkit.compare import launcher
    from peftkit.errors import PeftkitError

    assert launcher() == [sys.executable]
    two = launcher(2)
    assert two[1:3] == ["-m", "accelerate.commands.launch"] and two[two.index("--num_processes") + 1] == "2"
    configs = sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml"))
    assert [c.stem for c in configs] == ["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"]
    kinds = {c.stem: load_config_from_file(str(c)).distributed_type.value for c in configs}
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED", "fsdp": "FSDP"}
    assert launcher(1, configs[0])[3:5] == ["--config_file", str(configs[0])]
    with pytest.raises(PeftkitError, match="does not exist"):
        launcher(1, Path("nope.yaml"))
