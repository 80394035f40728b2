"""RL with verifiable rewards (task `grpo`, TRL's GRPOTrainer): refusals before any weights
load, a tiny-llama run that trains, picks its epoch by reward and saves its greedy replies,
a reward function that breaks at run time, init_from, and the memory estimate."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit.errors import PeftkitError
from peftkit.memory.estimate import estimate_run
from peftkit.memory.generation import kv_cache_bytes
from peftkit.memory.heads import fused_lm_head_bytes
from peftkit.memory.meta import load_config
from peftkit.resolve import make_config
from peftkit.tasks import resolve_task
from test_cli import assert_clean_failure, invoke
from test_sft import CHATML

LENGTH_REWARD = "def length(prompts, completions, **columns):\n    return [float(len(c[0]['content'])) for c in completions]\n"


def grpo_options(data_dir, **extra):
    return {"model": "tiny-llama", "task": "sst2-rl", "strategy": "lora", "data_dir": str(data_dir),
            "chat_template": CHATML, "max_train_samples": 16, "max_eval_samples": 6, "epochs": 1, "batch_size": 4,
            "num_generations": 2, "max_completion_length": 4, "max_new_tokens": 4, **extra}


def cli_flags(options):
    return [arg for key, value in options.items() for arg in ("--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}")]


@pytest.mark.parametrize(("extra", "expected"), [
    ({"rewards": "exat"}, "unknown reward 'exat' (did you mean 'exact'?)"),
    ({"rewards": "format"}, "the format reward needs the regex a reply must match"),
    ({"rewards": "exact:lots"}, "the weight 'lots' is not a finite number"),
    ({"rewards": "no_such_reward_module:f"}, "cannot import no_such_reward_module"),
    ({"batch_size": 3}, "batch_size 3 is not a multiple of num_generations 2: a batch holds whole groups of one "
                        "prompt's replies; set --batch-size 4"),
    ({"max_completion_length": 128, "max_length": 128}, "max_completion_length 128 leaves no room for a prompt"),
    ({"strategy": "linear-probe"}, "strategy 'linear-probe' trains only a new task head"),
])
def test_refusals_are_one_line_before_anything_loads(tmp_path, data_dir, extra, expected):
    out = tmp_path / "out"
    options = grpo_options(data_dir, **extra)
    strategy = options.pop("strategy")
    result = invoke("train", "--strategy", strategy, *cli_flags(options), "--output-dir", out)
    assert_clean_failure(result, expected, out)


def test_a_user_reward_file_is_imported_when_the_config_is_checked(tmp_path, data_dir):
    (tmp_path / "bad.py").write_text("raise RuntimeError('no reward today')\n")
    with pytest.raises(PeftkitError, match=r"cannot import .*bad.py \(RuntimeError: no reward today\)"):
        make_config(grpo_options(data_dir, rewards=f"{tmp_path / 'bad.py'}:f", output_dir=str(tmp_path / "out")))


def test_gsm8k_rl_rewards_the_final_number_by_default(data_dir, tmp_path):
    from peftkit.tasks.grpo import run_rewards

    config = make_config({**grpo_options(data_dir, task="gsm8k-rl"), "output_dir": str(tmp_path)})
    assert [r.name for r in run_rewards(config)] == ["gsm8k"]
    assert resolve_task("gsm8k-rl")[1].directory == "gsm8k"


def test_a_tiny_grpo_run_trains_selects_by_reward_and_saves_its_replies(tmp_path, data_dir):
    (tmp_path / "length.py").write_text(LENGTH_REWARD)
    result = peftkit.train({**grpo_options(data_dir, epochs=2, rewards=["exact", f"{tmp_path / 'length.py'}:length:0.5"]),
                            "output_dir": tmp_path / "run"})
    record = result.record
    assert record.task_kind == "grpo" and record.trainable_params > 0
    assert set(record.metrics) == {"reward", "reward_exact", "reward_length", "exact_match"}
    # the total is the weighted sum of the rewards (exact never matches for random weights)
    assert record.metrics["reward"] == pytest.approx(record.metrics["reward_exact"] + 0.5 * record.metrics["reward_length"])
    assert [h["epoch"] for h in record.eval_history] == [1.0, 2.0] and all("reward" in h for h in record.eval_history)
    assert record.selection.metric == "reward" and record.best_epoch in (1.0, 2.0)
    assert record.generation.generated == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {"prompt", "reference", "references", "generated", "finished", "reward"} <= set(lines[0])
    assert lines[0]["reference"] in ("positive", "negative")
    assert sum(line["reward"] for line in lines) / 6 == pytest.approx(record.metrics["reward"])


def test_a_reward_that_breaks_while_training_stops_the_run_in_one_line(tmp_path, data_dir):
    (tmp_path / "short.py").write_text("def short(prompts, completions, **columns):\n    return [1.0]\n")
    out = tmp_path / "out"
    options = grpo_options(data_dir, rewards=f"{tmp_path / 'short.py'}:short", select="last")
    result = invoke("train", "--strategy", options.pop("strategy"), *cli_flags(options), "--output-dir", out)
    assert result.exit_code == 2 and "Traceback" not in result.output  # progress bars come first: the error is last
    assert result.stderr.strip().splitlines()[-1].split("error: ")[-1] == (
        "reward function 'short' returned 1 values for 4 completions: return a list of one number per completion")
    assert not (out / "run.json").exists()


def test_beta_keeps_a_reference_and_saves_the_trained_adapter_alone(tmp_path, data_dir):
    result = peftkit.train({**grpo_options(data_dir, beta=0.1, select="last"), "output_dir": tmp_path / "run"})
    assert not (result.output_dir / "ref").exists()  # TRL's frozen reference adapter is not part of the run
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_grpo_starts_from_an_sft_run(tmp_path, data_dir):
    sft = peftkit.train({"model": "tiny-llama", "task": "sst2-chat", "strategy": "lora", "data_dir": str(data_dir),
                         "chat_template": CHATML, "max_train_samples": 16, "max_eval_samples": 4, "epochs": 1,
                         "batch_size": 8, "max_new_tokens": 2, "select": "last", "output_dir": tmp_path / "sft"})
    result = peftkit.train({**grpo_options(data_dir, init_from=str(sft.output_dir), select="last"),
                            "output_dir": tmp_path / "grpo"})
    assert result.record.config["init_from"] == str(sft.output_dir) and "reward" in result.metrics


def test_the_estimate_counts_each_batchs_replies_and_their_scored_tokens(tmp_path, data_dir):
    """batch_size counts replies: 8 = 2 prompts x num_generations 4. Generation keeps their
    keys and values for prompt + max_completion_length; the loss scores only reply tokens."""
    config = make_config({**grpo_options(data_dir, batch_size=8, num_generations=4, max_completion_length=16,
                                         max_new_tokens=8, eval_batch_size=2, max_length=256),
                          "output_dir": str(tmp_path)})
    model = load_config("tiny-llama")
    terms = estimate_run(config, device="cpu").terms
    values = 4  # fp32 on CPU (the suite pins it)
    assert terms["generation_cache"] == kv_cache_bytes(model, 8, 256 + 16, values)  # 8 replies, before a run: max_length
    assert terms["output_layer"] == fused_lm_head_bytes(model, 8 * 16, "cpu", backward=True, bytes_per_value=values)
    fewer = make_config({**config.model_dump(mode="json"), "batch_size": 4})
    assert estimate_run(fewer, device="cpu").terms["generation_cache"] == terms["generation_cache"] // 2
