"""The task registry: names and kinds, refusals before weights load, what trains beside each
strategy on a causal LM, and a new task kind added by one file and one decorator."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.models import resolve_model
from peftkit.strategies import build_strategy
from peftkit.tasks import DATASETS, TASKS, headline_metric, resolve_task, task_for_model


def test_data_set_names_map_to_task_kinds():
    assert {name: DATASETS[name].kind for name in ("sst2", "rte", "sst2-chat", "dolly", "gsm8k")} == {
        "sst2": "classification", "rte": "classification", "sst2-chat": "sft", "dolly": "sft", "gsm8k": "sft"}
    assert resolve_task("sft") == (TASKS["sft"], None)
    assert resolve_task("gsm8k")[1].answer_format == "gsm8k"
    with pytest.raises(PeftkitError, match="unknown task 'sst-2' \\(did you mean 'sst2'\\?\\)"):
        resolve_task("sst-2")


def test_tables_lead_with_the_metric_that_reads_the_answers():
    headlines = {name: headline_metric(*resolve_task(name)) for name in DATASETS}
    assert headlines["dolly"] == headlines["scitldr"] == "rouge_l"  # open-ended: exact match says nothing
    assert (headlines["sst2-chat"], headlines["gsm8k"], headlines["sst2"]) == ("exact_match", "exact_match", "accuracy")
    assert headline_metric(*resolve_task("sft")) == "exact_match"  # a user's own files: the kind's
    for name, metric in headlines.items():
        assert metric in TASKS[DATASETS[name].kind].metrics, name


def test_config_takes_the_tasks_defaults():
    classification = make_config({"task": "sst2"})
    sft = make_config({"task": "dolly", "model": "smollm2-135m"})
    assert (classification.max_length, classification.metric_for_best_model) == (128, "accuracy")
    assert (sft.max_length, sft.metric_for_best_model) == (1024, "loss")
    with pytest.raises(PeftkitError, match="metric_for_best_model 'accuracy' is not a metric of task 'sft'"):
        make_config({"task": "dolly", "metric_for_best_model": "accuracy"})


@pytest.mark.parametrize("task,strategy,message", [
    ("sst2-chat", "linear-probe", "trains only a new task head, and task 'sft' has none"),
    ("sst2", "none", "trains nothing, and task 'classification' adds a new, untrained head"),
])
def test_meaningless_pairs_are_refused_by_the_config(task, strategy, message):
    with pytest.raises(PeftkitError, match=message):
        make_config({"task": task, "strategy": strategy})


def causal_lm():
    return AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama").path, dtype=torch.float32)


def trainable(model):
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy,options,expected", [
    ("lora", {}, lambda n: "lora_" in n),
    ("adapter", {}, lambda n: ".adapter_" in n),
    ("ia3", {}, lambda n: "ia3_" in n),
    ("partial", {"trainable_layers": 1}, lambda n: n.startswith("model.layers.1.") or n == "model.norm.weight"),
    ("full", {}, lambda n: True),
])
def test_nothing_trains_beside_the_strategy_on_a_causal_lm(strategy, options, expected):
    """On a causal LM the task trains nothing beside the strategy: no copy of the LM head (PEFT's
    modules_to_save), no head region unfrozen by freezing strategies."""
    base = causal_lm()
    everything = {n for n, _ in base.named_parameters()}
    model = build_strategy(strategy, options).apply(base, TASKS["sft"])
    names = trainable(model)
    assert not any("modules_to_save" in n or "original_module" in n for n in names)
    assert names and all(expected(n) for n in names)
    if strategy == "full":
        assert names == everything
    if strategy == "partial":
        assert "lm_head.weight" not in names


def test_python_api_takes_the_task_from_the_model_class():
    model = causal_lm()
    assert task_for_model(model) is TASKS["sft"]
    wrapped = peftkit.apply_strategy(model, "lora", r=4)
    assert task_for_model(wrapped) is TASKS["sft"] and wrapped.peft_config["default"].task_type == "CAUSAL_LM"
    assert not any("lm_head" in n for n in trainable(wrapped))


def test_a_new_task_kind_is_one_file_and_one_decorator(tmp_path, data_dir, monkeypatch):
    """A toy task, written in tests/toy_task.py, trains end to end through the ordinary run."""
    import toy_task  # noqa: F401  (registers "toy-parity")

    assert "toy-parity" in TASKS
    result = peftkit.train({"model": "tiny-bert", "task": "toy-parity", "strategy": "lora", "train_file": data_dir / "sst2" / "validation.jsonl",
                            "validation_file": data_dir / "sst2" / "validation.jsonl", "max_train_samples": 64,
                            "max_eval_samples": 32, "epochs": 1, "output_dir": tmp_path / "toy"})
    assert result.record.task_kind == "toy-parity"
    assert result.record.data["label_names"] == ["even", "odd"]
    assert set(result.metrics) == {"accuracy", "loss"}
