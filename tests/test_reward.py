"""Reward models (task `reward`): a one-output head trained on preference pairs with TRL's
RewardTrainer, pairwise accuracy over every pair, reload, `peftkit predict` scores, the head
beside any strategy, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.errors import PeftkitError
from peftkit.inference import evaluate_run
from peftkit.resolve import make_config
from peftkit.loading import load_run
from peftkit.tasks import TASKS, load_data
from peftkit.tasks.reward import PadPairs, pair_metrics, score_sequences, sequence_ids
from test_cli import assert_clean_failure, invoke
from test_sft import CHATML


def reward_run(directory, data_dir, model="tiny-llama", task="reward:sst2-pref", strategy="lora", **extra):
    """A small reward run: 32 training pairs (a selection slice held out), 16 validation pairs."""
    config = {"model": model, "task": task, "strategy": strategy, "data_dir": data_dir, "chat_template": CHATML,
              "max_train_samples": 32, "max_eval_samples": 16, "epochs": 1, "batch_size": 8, "output_dir": directory,
              **extra}
    return peftkit.train(config)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, data_dir):
    return reward_run(tmp_path_factory.mktemp("reward") / "lora", data_dir)


def test_a_reward_run_records_pairwise_accuracy_and_margin(llama_run):
    record = llama_run.record
    assert record.task_kind == "reward"
    assert set(record.metrics) == {"accuracy", "margin", "loss"}
    assert 0.0 <= record.metrics["accuracy"] <= 1.0 and record.metrics["loss"] > 0
    assert record.data["validation_examples"] == 16 and record.data["data_format"] == "conversational"
    # the selection slice was scored with the exact pairwise accuracy, which chose the epoch
    assert record.eval_history and "accuracy" in record.eval_history[0] and record.best_epoch == 1.0


def test_a_reloaded_run_gives_the_recorded_scores(llama_run, data_dir):
    result = evaluate_run(llama_run.output_dir, data_dir)
    assert result["metrics"] == pytest.approx(result["recorded"], abs=1e-6)


def test_recorded_accuracy_is_the_share_of_pairs_whose_chosen_reply_scores_higher(llama_run):
    """Every validation pair scored by hand, one sequence at a time (no padding)."""
    config, model, tokenizer, record = load_run(llama_run.output_dir)
    pairs = load_data(config).validation
    scores = {side: score_sequences(model, tokenizer, [sequence_ids(tokenizer, row["prompt"], row[side])
                                                        for row in pairs], batch_size=1)
              for side in ("chosen", "rejected")}
    by_hand = sum(c > r for c, r in zip(scores["chosen"], scores["rejected"])) / len(pairs)
    assert by_hand == record.metrics["accuracy"]
    assert pair_metrics(scores["chosen"], scores["rejected"]) == pytest.approx(record.metrics, rel=1e-4, abs=1e-6)


def test_the_head_trains_beside_lora_and_is_saved_with_the_adapter(llama_run):
    saved = load_file(str(llama_run.output_dir / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in saved
    assert all("lora_" in name for name in saved if "score" not in name)
    assert not any("lm_head" in name for name in saved)  # the causal LM's own head is no part of the model
    _, model, _, _ = load_run(llama_run.output_dir)
    assert model.base_model.model.score.modules_to_save["default"].out_features == 1


def test_predict_scores_a_prompt_and_a_response(llama_run):
    prompt = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
              "a gripping , funny film")
    result = invoke("predict", "--run", llama_run.output_dir, prompt, "positive")
    assert result.exit_code == 0, result.output
    score = float(result.stdout.strip().splitlines()[-1])
    _, model, tokenizer, _ = load_run(llama_run.output_dir)
    conversation = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": "positive"}]
    expected = score_sequences(model, tokenizer, [sequence_ids(tokenizer, *conversation)], batch_size=1)[0]
    assert score == pytest.approx(expected, abs=1e-4)


def test_an_encoder_reward_model_reads_pairs_of_texts(tmp_path, data_dir, jsonl):
    """tiny-bert on standard (text) pairs of one's own: its tokenizer has no end-of-text token,
    and [SEP] ends each sequence."""
    rows = [json.loads(line) for line in (data_dir / "sst2" / "train.jsonl").read_text().splitlines()[:48]]
    words = ("negative", "positive")
    pairs = [{"prompt": f"Review: {row['sentence']}\nSentiment:", "chosen": f" {words[row['label']]}",
              "rejected": f" {words[1 - row['label']]}"} for row in rows]
    result = reward_run(tmp_path / "bert", data_dir, model="tiny-bert", task="reward", strategy="full",
                        train_file=jsonl("train.jsonl", pairs[:32]),
                        validation_file=jsonl("validation.jsonl", pairs[32:]), chat_template=None)
    assert result.record.data["data_format"] == "standard"
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    _, model, tokenizer, record = load_run(result.output_dir)
    ids = sequence_ids(tokenizer, pairs[0]["prompt"], pairs[0]["chosen"])
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    [line] = TASKS["reward"].predict(model, tokenizer, record, [[pairs[0]["prompt"], pairs[0]["chosen"]]],
                                     make_config(record.config))
    assert float(line) == pytest.approx(score_sequences(model, tokenizer, [ids], 1)[0], abs=1e-4)


@pytest.mark.parametrize("strategy", ["qlora", "prompt-tuning"])
def test_a_4bit_base_and_left_padded_prompt_learning_train_and_reload(tmp_path, data_dir, strategy):
    """qlora: TRL's bf16 cast of the trainable weights is undone (the head multiplies fp32
    inputs); prompt tuning: the decoder's pairs are padded on the left, its head reading the
    last position."""
    result = reward_run(tmp_path / strategy, data_dir, strategy=strategy, max_train_samples=16)
    reloaded = evaluate_run(result.output_dir, data_dir)
    assert reloaded["metrics"] == pytest.approx(reloaded["recorded"], abs=1e-6)


def test_linear_probe_trains_the_head_only(tmp_path, data_dir):
    result = reward_run(tmp_path / "probe", data_dir, strategy="linear-probe", max_train_samples=16)
    assert result.record.trainable_params == 64  # score: hidden size 64 -> one output, no bias


def test_pairs_are_batched_chosen_first_and_padded_on_the_tokenizers_side():
    class Tokenizer:
        pad_token_id, padding_side = 0, "left"

    batch = PadPairs(Tokenizer())([{"chosen_ids": [1, 2, 3], "rejected_ids": [4]},
                                   {"chosen_ids": [5], "rejected_ids": [6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 5], [0, 0, 4], [0, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_a_strategy_that_trains_nothing_is_refused():
    with pytest.raises(PeftkitError, match="trains nothing, and task 'reward' adds a new, untrained head"):
        make_config({"task": "reward:hh-rlhf-harmless", "strategy": "none"})


def test_a_data_set_of_another_form_is_refused(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "reward:sst2", "--model", "tiny-llama", "--data-dir", data_dir,
                    "--output-dir", out)
    assert_clean_failure(result, "reward cannot read data set sst2, made for classification", out)


@pytest.mark.real
def test_smollm2_lora_reward_model_on_hh_rlhf(tmp_path, data_dir):
    result = peftkit.train({"model": "smollm2-135m", "task": "reward:hh-rlhf-harmless", "strategy": "lora",
                            "data_dir": data_dir, "max_train_samples": 64, "max_eval_samples": 32, "epochs": 1,
                            "batch_size": 8, "max_length": 256, "output_dir": tmp_path / "smollm2"})
    assert result.record.data["data_format"] == "conversational"
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["loss"] > 0
