"""Preference tuning (dpo, kto, orpo, simpo): runs and their metrics, the reference (the adapter
disabled, or a counted frozen copy), SFT then DPO with init_from, and every refusal."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.loading import load_run
from peftkit.memory.estimate import estimate
from peftkit.resolve import make_config
from peftkit.tasks import DATASETS
from peftkit.tasks.pairs import tokenize_pair
from peftkit.tasks.preference import implicit_rewards, likelihood_preference, reply_logps
from test_cli import assert_clean_failure, invoke
from test_sft import CHATML


def tiny(tmp_path, data_dir, task="sst2-pref", strategy="lora", **extra):
    return {"model": "tiny-llama", "task": task, "strategy": strategy, "data_dir": data_dir, "chat_template": CHATML,
            "max_train_samples": 40, "max_eval_samples": 8, "epochs": 1, "batch_size": 4, "eval_batch_size": 8,
            "max_new_tokens": 2, "max_length": 96, "output_dir": tmp_path / f"{task.replace(':', '-')}-{strategy}",
            **extra}


def test_dpo_lora_run_records_every_metric_and_saves_predictions(tmp_path, data_dir):
    result = peftkit.train(tiny(tmp_path, data_dir))
    record = result.record
    assert record.task_kind == "dpo"
    assert set(record.metrics) == {"likelihood_accuracy", "likelihood_margin", "reward_accuracy", "reward_margin",
                                   "exact_match"}
    assert all(0 <= record.metrics[m] <= 1 for m in ("likelihood_accuracy", "reward_accuracy", "exact_match"))
    assert record.eval_history and "likelihood_accuracy" in record.eval_history[0]
    assert (result.output_dir / "predictions.jsonl").read_text().count("\n") == 8
    assert (result.output_dir / "adapter_config.json").is_file()


def test_open_ended_pairs_are_scored_by_likelihood_only(tmp_path, data_dir):
    record = peftkit.train(tiny(tmp_path, data_dir, task="hh-rlhf-harmless", strategy="none", max_length=256)).record
    assert set(record.metrics) == {"likelihood_accuracy", "likelihood_margin", "reward_accuracy", "reward_margin"}
    assert record.metrics["reward_margin"] == 0  # untuned: the model is its own reference


def test_the_untuned_model_has_a_likelihood_accuracy(tmp_path, data_dir):
    record = peftkit.train(tiny(tmp_path, data_dir, strategy="none")).record
    assert record.trainable_params == 0 and 0 <= record.metrics["likelihood_accuracy"] <= 1


def test_kto_trains_on_pairs_split_into_desirable_and_undesirable_replies(tmp_path, data_dir):
    record = peftkit.train(tiny(tmp_path, data_dir, task="kto:sst2-pref")).record
    assert record.task_kind == "kto" and "reward_accuracy" in record.metrics


def test_reward_accuracy_is_trls_and_the_adapter_is_the_only_copy(tmp_path, data_dir, monkeypatch):
    """With lora the reference is the base with the adapter disabled (TRL keeps no second
    model); peftkit's implicit-reward accuracy and margin are TRL's rewards/accuracies and
    rewards/margins on the same pairs."""
    trainers = []
    kind = type(make_config(tiny(tmp_path, data_dir)).task_kind)
    build = kind.build_trainer

    def keep(self, *args, **kwargs):
        trainers.append(build(self, *args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(kind, "build_trainer", keep)
    peftkit.train(tiny(tmp_path, data_dir))
    trainer = trainers[0]
    assert trainer.ref_model is None
    logged = [log for log in trainer.state.log_history if "eval_rewards/accuracies" in log][-1]
    assert logged["eval_reward_accuracy"] == pytest.approx(logged["eval_rewards/accuracies"])
    assert logged["eval_reward_margin"] == pytest.approx(logged["eval_rewards/margins"], abs=1e-4)


def test_full_fine_tuning_keeps_a_reference_copy_the_estimate_counts():
    lora = estimate("tiny-llama", "lora", task="dpo", device="cpu")
    full = estimate("tiny-llama", "full", task="dpo", device="cpu")
    orpo = estimate("tiny-llama", "full", task="orpo", device="cpu")
    assert lora.terms["reference_model"] == 0 and orpo.terms["reference_model"] == 0
    assert full.terms["reference_model"] == full.terms["weights"]
    # a pair puts two sequences in the batch
    sft = estimate("tiny-llama", "lora", batch_size=4, task="sft", device="cpu")
    dpo = estimate("tiny-llama", "lora", batch_size=4, task="dpo", device="cpu")
    assert dpo.terms["activations"] == pytest.approx(2 * sft.terms["activations"], rel=0.01)
    assert dpo.settings["batch_size"] == 4


def test_full_dpo_trains_beside_its_frozen_reference(tmp_path, data_dir):
    record = peftkit.train(tiny(tmp_path, data_dir, strategy="full", learning_rate=1e-4)).record
    assert record.metrics["reward_margin"] != 0  # the policy moved away from its reference


def test_likelihood_and_reward_metrics_by_hand():
    logps = {"chosen": [-2.0, -9.0], "rejected": [-4.0, -3.0], "chosen_tokens": [2, 3], "rejected_tokens": [2, 1]}
    # mean per token: chosen -1 and -3, rejected -2 and -3 (a tie is not a preference)
    assert likelihood_preference(logps) == {"likelihood_accuracy": 0.5, "likelihood_margin": pytest.approx(0.5)}
    reference = {"chosen": [-3.0, -9.0], "rejected": [-4.0, -2.0]}
    # (log p - log p_ref) of chosen minus rejected: 1 - 0 and 0 - (-1)
    assert implicit_rewards(logps, reference, beta=0.5) == {"reward_accuracy": 1.0, "reward_margin": pytest.approx(0.5)}


def test_sft_then_dpo_the_sft_model_is_the_reference(tmp_path, data_dir):
    """DPO init_from an SFT lora run: the DPO run's model with its adapter disabled scores the
    validation pairs exactly as the SFT model does."""
    sft = peftkit.train({**tiny(tmp_path, data_dir, task="sst2-chat"), "output_dir": tmp_path / "sft",
                         "learning_rate": 1e-2}).output_dir
    dpo = peftkit.train(tiny(tmp_path, data_dir, init_from=str(sft))).output_dir
    _, sft_model, tokenizer, _ = load_run(sft)
    _, dpo_model, _, record = load_run(dpo)
    config = make_config(tiny(tmp_path, data_dir))
    pairs = [tokenize_pair(tokenizer, row) for row in config.task_kind.load_data(config, DATASETS["sst2-pref"]).validation]
    with torch.no_grad():
        theirs = reply_logps(sft_model, pairs, 8)
        ours = reply_logps(dpo_model, pairs, 8, reference=True)
    assert ours["chosen"] == pytest.approx(theirs["chosen"], abs=1e-4)
    assert ours["rejected"] == pytest.approx(theirs["rejected"], abs=1e-4)
    base = reply_logps(sft_model, pairs, 8, reference=True)  # the SFT adapter disabled: the untuned base
    assert base["chosen"] != pytest.approx(theirs["chosen"], abs=1e-4)  # the SFT adapter did change the model


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "linear-probe"], "trains only a new task head"),
    (["--set", "loss_type=nope"], "loss_type nope is not one of TRL's DPO losses"),
    (["--set", "loss_type=[sigmoid,sft]", "--set", "loss_weights=[1.0]"], "loss_weights has 1 weights for 2"),
    (["--set", "init_from=/nonexistent/run"], "init_from /nonexistent/run is not a directory"),
])
def test_refusals_are_one_line_before_weights_load(tmp_path, data_dir, flags, message):
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-llama", "--task", "sst2-pref", "--data-dir", data_dir,
                    "--set", f"chat_template={CHATML}", "--output-dir", out, *flags)
    assert_clean_failure(result, message, out)


def test_a_file_without_rejected_replies_is_refused(tmp_path, jsonl):
    train = jsonl("train.jsonl", [{"prompt": "a", "chosen": "b"}])
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-llama", "--task", "dpo", "--train-file", train, "--validation-file",
                    train, "--output-dir", out)
    assert_clean_failure(result, "rejected", out)


def test_init_from_a_run_of_another_model_is_refused(tmp_path, data_dir):
    sft = peftkit.train({**tiny(tmp_path, data_dir, task="sst2-chat", max_train_samples=8), "output_dir": tmp_path / "s"})
    out = tmp_path / "out"
    result = invoke("train", "--model", "smollm2-135m", "--task", "sst2-pref", "--data-dir", data_dir,
                    "--set", f"init_from={sft.output_dir}", "--output-dir", out)
    assert_clean_failure(result, "trained model tiny-llama", out)


@pytest.mark.real
@pytest.mark.parametrize("task", ["orpo:sst2-pref", "simpo:sst2-pref"])
def test_orpo_and_simpo_train_smollm2(tmp_path, data_dir, task):
    options = tiny(tmp_path, data_dir, task=task, max_train_samples=16, max_eval_samples=4)
    options.pop("chat_template")
    record = peftkit.train({**options, "model": "smollm2-135m"}).record
    assert record.task_kind == task.split(":")[0]
    assert "reward_accuracy" not in record.metrics and 0 <= record.metrics["likelihood_accuracy"] <= 1


def test_the_chat_template_is_saved_with_the_run(tmp_path, data_dir):
    result = peftkit.train(tiny(tmp_path, data_dir, strategy="none"))
    assert (result.output_dir / "chat_template.jinja").read_text() == CHATML


def test_init_from_a_run_without_an_lm_head_is_refused(tmp_path, data_dir):
    classifier = peftkit.train({"model": "tiny-llama", "task": "sst2", "strategy": "lora", "data_dir": data_dir,
                                "max_train_samples": 16, "max_eval_samples": 8, "epochs": 1,
                                "output_dir": tmp_path / "classifier"})
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-llama", "--task", "sst2-pref", "--data-dir", data_dir,
                    "--set", f"chat_template={CHATML}", "--set", f"init_from={classifier.output_dir}",
                    "--output-dir", out)
    assert_clean_failure(result, "is a classification run: start from a run of a causal LM task (sft, grpo, dpo", out)
