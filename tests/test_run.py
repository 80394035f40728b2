"""End to end on a tiny model and real SST-2 rows: train, outputs, reload, eval, predict."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.inference import evaluate_run, predict
from peftkit.loading import load_run

BASE = {"model": "tiny-bert", "task": "sst2", "max_train_samples": 64, "max_eval_samples": 48,
        "epochs": 1, "batch_size": 16}


def train(tmp_path, data_dir, strategy, **extra):
    config = {**BASE, "data_dir": data_dir, "strategy": strategy, "output_dir": tmp_path / str(strategy), **extra}
    return peftkit.train(config)


def logits(model, tokenizer):
    batch = tokenizer(["a gripping , funny film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "partial", "linear-probe", "bitfit", "lora", "dora", "qlora"])
def test_train_save_reload_gives_identical_results(tmp_path, data_dir, strategy, capsys):
    result = train(tmp_path, data_dir, strategy)
    assert "trainable params:" in capsys.readouterr().out
    record = result.record
    for key in ("config", "versions", "data", "metrics", "trainable_params", "total_params", "peak_memory_bytes",
                "train_time_s", "samples_per_s", "tokens_per_s", "size_on_disk_bytes"):
        assert getattr(record, key) is not None, key
    # 10% of the 64 training examples are held out to choose the checkpoint on
    assert record.data == {**record.data, "train_examples": 57, "selection_examples": 7, "validation_examples": 48}
    assert record.peak_memory_bytes > 0 and record.tokens_per_s > 0

    _, model, tokenizer, _ = load_run(result.output_dir)
    reproduced = evaluate_run(result.output_dir)["metrics"]
    assert round(reproduced["accuracy"], 4) == round(record.metrics["accuracy"], 4)
    assert reproduced["loss"] == pytest.approx(record.metrics["loss"], abs=1e-5)
    label, probability = predict(result.output_dir, [["a gripping , funny film"]])[0].split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1.0
    again = load_run(result.output_dir)[1]
    assert torch.equal(logits(model, tokenizer), logits(again, tokenizer))


@pytest.mark.slow
def test_saved_forms_are_the_smallest_faithful_ones(tmp_path, data_dir):
    probe = train(tmp_path, data_dir, "linear-probe").output_dir
    assert set(load_file(probe / "trained_weights.safetensors")) == {"classifier.weight", "classifier.bias"}
    lora = train(tmp_path, data_dir, "lora").output_dir
    assert (lora / "adapter_config.json").is_file() and (lora / "adapter_model.safetensors").is_file()
    full = train(tmp_path, data_dir, "full").output_dir
    assert (full / "model" / "model.safetensors").is_file()
    assert json.loads((full / "run.json").read_text())["saved_as"] == "whole-model"
    for run in (probe, lora, full):
        assert (run / "tokenizer.json").is_file()


def test_id2label_is_saved_with_the_model(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "full").output_dir
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_early_stopping_stops_and_keeps_the_best(tmp_path, data_dir):
    result = train(tmp_path, data_dir, "linear-probe", epochs=6, early_stopping_patience=1, learning_rate=1e-9)
    assert result.record.epochs_trained < 6  # a tiny rate cannot improve: stops after one bad epoch
    assert result.record.best_epoch == 1


def test_llama_decoder_trains_as_a_classifier(tmp_path, data_dir):
    result = train(tmp_path, data_dir, "lora", model="tiny-llama")
    assert result.record.config["model"] == "tiny-llama"
    assert 0 <= result.metrics["accuracy"] <= 1


def test_sentence_pair_task(tmp_path, data_dir):
    result = train(tmp_path, data_dir, "bitfit", task="rte")
    assert result.record.data["text_columns"] == ["sentence1", "sentence2"]
    label, _ = predict(result.output_dir, [["A man sleeps.", "Someone is asleep."]])[0].split("\t")
    assert label in ("entailment", "not_entailment")


def test_layer_lr_decay_runs_through_training(tmp_path, data_dir):
    result = train(tmp_path, data_dir, {"name": "partial", "trainable_layers": 1, "layer_lr_decay": 0.8, "head_lr": 1e-2})
    assert result.record.config["strategy"]["head_lr"] == 1e-2


@pytest.mark.parametrize("strategy", ["full", "qlora"])
def test_gradient_checkpointing(tmp_path, data_dir, strategy):
    result = train(tmp_path, data_dir, strategy, gradient_checkpointing=True, max_train_samples=32)
    assert result.record.config["gradient_checkpointing"] is True
    assert result.record.train_time_s > 0


def test_run_record_keeps_every_evaluation_and_the_longest_example(tmp_path, data_dir):
    record = train(tmp_path, data_dir, "bitfit", epochs=2).record
    assert [round(h["epoch"]) for h in record.eval_history] == [1, 2]  # on the selection slice
    assert record.selection.model_dump() == {"select": "best", "metric": "accuracy", "on": "held-out slice of the training data"}
    assert 8 < record.data["longest_train_example"] <= 128
    # the machine, so that times from different CPUs are not read as one's
    assert record.device.startswith("cpu (") and torch.backends.cpu.get_cpu_capability() in record.device


def test_adapter_trains_on_a_4bit_base_and_reloads(tmp_path, data_dir):
    result = train(tmp_path, data_dir, {"name": "adapter", "variant": "pfeiffer"}, model="tiny-llama", quantization="nf4")
    _, model, tokenizer, _ = load_run(result.output_dir)
    frozen = model.model.layers[0].mlp.down_proj
    assert type(frozen.weight).__name__ == "Params4bit"
    reproduced = evaluate_run(result.output_dir)["metrics"]
    assert reproduced["loss"] == pytest.approx(result.record.metrics["loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "lora", "prompt-tuning"])  # tests/test_pooling.py: the reading under nine
def test_mean_pooling_trains_and_reloads_under_every_strategy_family(tmp_path, data_dir, strategy):
    result = train(tmp_path, data_dir, strategy, pooling="mean")
    assert result.record.config["pooling"] == "mean"
    _, model, tokenizer, _ = load_run(result.output_dir)
    reproduced = evaluate_run(result.output_dir)["metrics"]
    assert reproduced["loss"] == pytest.approx(result.record.metrics["loss"], abs=1e-5)
    plain = load_run(result.output_dir, pooling="model")[1]  # the same weights read through the pooler
    assert not torch.allclose(logits(model, tokenizer), logits(plain, tokenizer))


def test_qlora_keeps_training_after_an_evaluation(tmp_path, data_dir):
    # bitsandbytes would repack the 4-bit weights for inference at the first evaluation
    # (on CPUs with AVX512-BF16) and the second epoch would then fail in autograd
    record = train(tmp_path, data_dir, "qlora", epochs=2).record
    assert [round(h["epoch"]) for h in record.eval_history] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "adapter", "full", "bitfit", "linear-probe"])
def test_bf16_weights_stay_bf16_and_trainable_ones_fp32(tmp_path, data_dir, strategy, monkeypatch):
    """dtype bf16: the frozen base loads in bf16, what trains is fp32 (mixed precision), and the
    run trains, evaluates and reloads under bf16 autocast on CPU. A module whose own weights
    mix trainable and frozen ones (bitfit's biases) keeps them all fp32 (CPU layer norm refuses
    a bf16 weight beside an fp32 bias); linear-probe's features are computed under the run's autocast.
    LoRA's layers take their input at autocast's precision in training (the reloaded run, which
    keeps PEFT's upcast, scores the same loss)."""
    import peftkit.models
    from peftkit.models import load_for_classification, load_tokenizer, resolve_model
    from peftkit.models import keep_trainable_fp32
    from peftkit.loading import weight_options
    from peftkit.resolve import make_config
    from peftkit.strategies import build_strategy

    config = make_config({**BASE, "data_dir": data_dir, "strategy": strategy, "dtype": "bf16"})
    assert config.compute_precision() == "bf16"
    source = resolve_model("tiny-bert")
    base = load_for_classification(source, ["neg", "pos"], load_tokenizer(source), **weight_options(config))
    from peftkit.tasks import TASKS

    model = keep_trainable_fp32(build_strategy(strategy).apply(base, TASKS["classification"]))
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert (True, torch.float32) in dtypes and (True, torch.bfloat16) not in dtypes
    assert strategy == "full" or (False, torch.bfloat16) in dtypes
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        assert not any(p.requires_grad for p in own) or all(p.dtype == torch.float32 for p in own), module
    skipped, skip = [], peftkit.models.skip_adapter_input_upcast
    monkeypatch.setattr(peftkit.models, "skip_adapter_input_upcast", lambda model: skipped.append(skip(model)))
    result = train(tmp_path, data_dir, strategy, dtype="bf16")
    assert skipped == [12 if strategy == "lora" else 0]  # tiny-bert: 6 projections x 2 layers
    assert result.record.config["dtype"] == "bf16" and 0 <= result.metrics["accuracy"] <= 1
    assert result.metrics["loss"] == result.metrics["loss"]  # not NaN
    reproduced = evaluate_run(result.output_dir)["metrics"]
    assert reproduced["loss"] == pytest.approx(result.metrics["loss"], abs=1e-2)


def test_dtype_and_precision_must_agree():
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match="dtype bf16 needs precision bf16"):
        peftkit.train({**BASE, "dtype": "bf16", "precision": "fp32"})


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw-32bit", "adafactor", "sgd"])
def test_every_optimizer_trains(tmp_path, data_dir, optimizer):
    record = train(tmp_path, data_dir, "lora", optimizer=optimizer, max_grad_norm=0.5, attn_implementation="eager").record
    assert record.config["optimizer"] == optimizer and record.metrics["loss"] == record.metrics["loss"]


def test_a_diverging_run_stops_at_the_step_with_one_line_and_saves_nothing(tmp_path, data_dir):
    from test_cli import invoke

    out = tmp_path / "run"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "full", "--data-dir", data_dir,
                    "--max-train-samples", 64, "--max-eval-samples", 16, "--optimizer", "sgd", "--lr", "1e30",
                    "--set", "max_grad_norm=0", "--set", "select=last", "--output-dir", out)
    # after the progress bar, one error line naming the step and learning rate; no traceback, nothing written
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1].split("\r")[-1]
    assert re.search(r"error: training diverged at step \d+: the loss is NaN or infinite \(learning rate \S+\)", last)
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_non_finite_gradients_stop_before_the_optimizer_step(tmp_path):
    from types import SimpleNamespace

    from peftkit.errors import PeftkitError
    from peftkit.trainer import Timed

    class TrainerNorm:  # what Trainer computes before each optimizer step, here given
        def _get_grad_norm(self, model, grad_norm=None):
            return grad_norm

        def _get_learning_rate(self):
            return 0.5

    class Probe(Timed, TrainerNorm):
        def __init__(self):
            self.state, self.args = SimpleNamespace(global_step=6), SimpleNamespace(output_dir=str(tmp_path))

    probe = Probe()
    assert probe._get_grad_norm(None, torch.tensor(3.0)) == 3.0  # finite: passed on
    with pytest.raises(PeftkitError, match=r"diverged at step 7: a gradient is NaN or infinite \(learning rate 0.5\); "
                                           "nothing was saved"):
        probe._get_grad_norm(None, torch.tensor(float("inf")))
    (tmp_path / "checkpoint-3").mkdir()  # an earlier, good checkpoint is kept and named
    with pytest.raises(PeftkitError, match=r"the last good checkpoint stays in .*checkpoint-3: lower --learning-rate"):
        probe._get_grad_norm(None, torch.tensor(float("nan")))


def test_truncated_examples_are_counted_per_split(tmp_path, data_dir):
    from datasets import Dataset

    from peftkit.models import load_tokenizer, resolve_model
    from peftkit.tasks.classification import tokenize

    tokenizer = load_tokenizer(resolve_model("tiny-bert"))
    rows = Dataset.from_dict({"sentence": ["short", "a much longer sentence that runs well past eight tokens of text"]})
    assert tokenize(rows, tokenizer, ["sentence"], 8)["truncated"] == [0, 1]
    record = train(tmp_path, data_dir, "bitfit", max_length=8, select="last").record
    counts = record.data["truncated_examples"]
    assert set(counts) == {"train", "validation"} and 0 < counts["train"] <= 64 and 0 < counts["validation"] <= 48


def test_a_run_the_memory_cannot_hold_stops_before_loading_and_names_what_fits(tmp_path, data_dir, monkeypatch):
    """The guard asks the estimate at the data's longest examples; here an estimate that only
    half the batch brings under the free memory."""
    from types import SimpleNamespace

    import peftkit.memory.estimate
    import peftkit.run
    from peftkit.errors import PeftkitError

    asked = []

    def estimate_run(config, run=None, device=None):
        asked.append(run)
        return SimpleNamespace(total_bytes=2**30 * config.batch_size)  # 1 GiB per example in the batch

    monkeypatch.setattr(peftkit.memory.estimate, "estimate_run", estimate_run)
    monkeypatch.setattr(peftkit.run, "free_memory_bytes", lambda device: 12 * 2**30)
    loaded = []
    monkeypatch.setattr(peftkit.run, "base_quantization", lambda *a: loaded.append(a))  # called right before loading
    config = {**BASE, "data_dir": data_dir, "strategy": "lora", "output_dir": tmp_path / "run"}
    with pytest.raises(PeftkitError, match=r"needs about 16.00 GiB by peftkit estimate, and cpu has 12.00 GiB free; "
                                           r"these fit: --batch-size 8 \(more --gradient-accumulation-steps\), "
                                           r"or --force to try anyway"):
        peftkit.train(config)
    assert not loaded and not (tmp_path / "run").exists()  # stopped before any weights loaded
    assert asked[0]["data"]["longest_train_example"] <= 128  # the data's longest example, not max_length's guess
    monkeypatch.undo()
    monkeypatch.setattr(peftkit.run, "free_memory_bytes", lambda device: 1)
    result = peftkit.train({**config, "force": True, "max_train_samples": 16, "epochs": 1})
    assert result.record.config["force"] is True


@pytest.mark.parametrize("record, resolved", [
    ({"precision": {"weights": "bf16", "compute": "bf16"}, "config": {}, "device": "cpu (x86_64, 2 threads)"},
     {"dtype": "bf16", "precision": "bf16"}),
    ({"config": {"dtype": "auto", "precision": "auto"}, "device": "cpu (x86_64, 2 threads)"}, {"dtype": "fp32", "precision": "fp32"}),
    ({"config": {"dtype": "auto", "precision": "bf16"}, "device": "cpu (x86_64, 2 threads)"}, {"dtype": "fp32"}),
    ({"config": {"dtype": "bf16", "precision": "auto"}, "device": "cpu (x86_64, 2 threads)"}, {}),
    ({"config": {"dtype": "auto", "precision": "auto"}, "device": "NVIDIA H200"}, {})])
def test_a_run_reloads_in_the_precision_it_trained_in(record, resolved):
    """Records keep what auto resolved to; older CPU records resolved auto to fp32 (before auto
    meant bf16 on CPUs with bf16 instructions), and reload so."""
    from peftkit.record import RunRecord
    from test_record import OLD_RECORD  # a record from before precision was kept

    assert RunRecord.model_validate({**OLD_RECORD, **record}).trained_precision() == resolved
