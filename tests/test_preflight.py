"""Options checked against the model and the device before any weights load."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.checkpoints import checkpoint_root
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from test_cli import assert_clean_failure, invoke


def options(tmp_path, data_dir, **changes):
    return {"model": "tiny-bert", "task": "sst2", "strategy": "lora", "data_dir": str(data_dir), "max_train_samples": 16,
            "max_eval_samples": 8, "epochs": 1, "output_dir": str(tmp_path / "run"), **changes}


def test_max_length_past_the_models_positions_is_refused(tmp_path, data_dir):
    with pytest.raises(PeftkitError, match=r"max_length 100000 is more than minilm has positions \(512, .*--max-length 512 or less"):
        peftkit.train(options(tmp_path, data_dir, model="minilm", max_length=100000))
    assert not (tmp_path / "run").exists() and not checkpoint_root(tmp_path / "run").exists()


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(tmp_path, data_dir):
    result = invoke("train", "--model", "tiny-bert", "--task", "sst2", "--precision", "fp16", "--data-dir", data_dir,
                    "--output-dir", tmp_path / "run")
    assert_clean_failure(result, "fp16 mixed precision needs a CUDA GPU, and this run is on the CPU", tmp_path / "run")
    assert not checkpoint_root(tmp_path / "run").exists()
    dry = invoke("train", "--model", "tiny-bert", "--task", "sst2", "--precision", "fp16", "--dry-run", "--device", "cpu")
    assert dry.exit_code == 2 and "fp16 mixed precision needs a CUDA GPU" in dry.stderr


def test_a_generation_longer_than_the_models_positions_is_refused(tmp_path, data_dir):
    with pytest.raises(PeftkitError, match="max_new_tokens 2048 leaves no room for a prompt in tiny-llama's 2048 positions"):
        peftkit.train(options(tmp_path, data_dir, model="tiny-llama", task="sst2-chat", max_new_tokens=2048))


@pytest.mark.parametrize("option", ["max_new_tokens", "max_generate_samples"])
def test_a_generation_setting_on_a_task_that_generates_nothing_is_refused(option):
    with pytest.raises(PeftkitError, match=f"{option} sets how answers are generated, and task 'classification' "
                                           "generates no text"):
        make_config({"model": "tiny-bert", "task": "sst2", option: 4})


def test_an_output_dir_that_cannot_be_written_is_refused_before_loading(tmp_path, data_dir):
    result = invoke("train", "--model", "tiny-bert", "--task", "sst2", "--data-dir", data_dir,
                    "--output-dir", "/proc/peftkit-run")
    assert result.exit_code == 2 and "--output-dir /proc/peftkit-run: cannot write in /proc" in result.stderr
    assert "Traceback" not in result.output


def test_merge_output_that_cannot_be_written_is_refused(tmp_path):
    from test_fast_refusals import fake_run

    run = fake_run(tmp_path / "run", "sst2", "classification")
    result = invoke("merge", "--run", run, "--output", "/proc/peftkit-merged")
    assert result.exit_code == 2 and "--output /proc/peftkit-merged: cannot write in /proc" in result.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro: needs root, as CI runs)."""
    import subprocess

    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(target)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_an_output_dir_on_a_read_only_filesystem_is_refused_before_loading(read_only_dir, data_dir):
    result = invoke("train", "--model", "tiny-bert", "--task", "sst2", "--data-dir", data_dir,
                    "--output-dir", read_only_dir / "run")
    assert_clean_failure(result, f"--output-dir {read_only_dir / 'run'}: cannot write in {read_only_dir} "
                                 "(Read-only file system): choose another --output-dir", read_only_dir / "run")
