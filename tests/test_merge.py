"""`peftkit merge`: the merged plain transformers checkpoint computes what the run computes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import peftkit
from peftkit.errors import PeftkitError
from peftkit.merge import merge_run
from peftkit.loading import load_run
from test_cli import assert_clean_failure, invoke

TEXTS = ["a gripping , funny film", "dull and far too long", "the cast is good but the script is a mess",
         "one of the best films of the year , full stop", "meh"]


def train(tmp_path, data_dir, strategy):
    return peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 64,
                          "max_eval_samples": 48, "epochs": 1, "batch_size": 16, "strategy": strategy,
                          "output_dir": tmp_path / strategy.replace(":", "-")}).output_dir


def outputs(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, output_hidden_states=True)


def load_merged(directory):
    return AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "dora", "ia3", "peft:loha"])
def test_merged_checkpoint_gives_the_runs_logits(tmp_path, data_dir, strategy):
    run = train(tmp_path, data_dir, strategy)
    out = tmp_path / "merged"
    result = invoke("merge", "--run", run, "--output", out)
    assert result.exit_code == 0, result.output
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    note = json.loads((out / "merge.json").read_text())
    assert note["strategy"]["name"] == strategy and note["merged_into"] == "unquantized float32 base"
    assert note["run_metrics"] == json.loads((run / "run.json").read_text())["metrics"]  # they describe these weights

    _, model, tokenizer, _ = load_run(run)
    merged = load_merged(out)
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert (outputs(merged, tokenizer).logits - outputs(model, tokenizer).logits).abs().max() < 1e-4


def test_qlora_merges_into_the_unquantized_base(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "qlora")
    note = merge_run(run, tmp_path / "merged")
    assert note["run_metrics"] is None and "never evaluated" in note["metrics_note"]  # the 4-bit run's are not these
    _, quantized, tokenizer, _ = load_run(run)
    four_bit = outputs(quantized, tokenizer)
    merged = outputs(load_merged(tmp_path / "merged"), tokenizer)
    adapter_on_full_base = outputs(load_run(run, quantized=False)[1], tokenizer)

    # Exact: the merge is the trained adapter on the unquantized base.
    assert (merged.logits - adapter_on_full_base.logits).abs().max() < 1e-4

    # Close to the 4-bit model that was trained: the two share every trained tensor and differ only
    # by NF4 rounding of the frozen base (16 levels per 64-weight block; measured relative error
    # of a tiny-bert weight matrix ~9%). The residual stream, whose embeddings are not quantized,
    # carries it at ~0.5% (bound 2%); the quantized pooler passes ~10% of it on, and the tiny
    # logits of this 1-epoch random model (|logit| < 0.01) end ~21% apart (bound 50%).
    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert relative(four_bit.hidden_states[-1], merged.hidden_states[-1]) < 0.02
    assert relative(four_bit.logits, merged.logits) < 0.5
    assert not torch.equal(four_bit.logits, merged.logits)  # really a different (unquantized) base


@pytest.mark.parametrize("strategy,reason", [
    ("prompt-tuning", "prompt learning prepends trained virtual tokens to the input; there are no weights to fold them into"),
    ("linear-probe", "only PEFT adapters (lora, dora, qlora, ia3, peft:<method>) fold into the base weights"),
])
def test_strategies_without_weights_to_fold_refuse_to_merge(tmp_path, data_dir, strategy, reason):
    run = train(tmp_path, data_dir, strategy)
    out = tmp_path / "merged"
    result = invoke("merge", "--run", run, "--output", out)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: strategy {strategy} cannot be merged: {reason}"
    assert not out.exists()


def test_a_mean_pooled_run_refuses_to_merge(tmp_path, data_dir):
    """A plain transformers checkpoint would read the [CLS] pooler, not the mean the run trained on."""
    run = peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 32,
                         "max_eval_samples": 16, "epochs": 1, "strategy": "lora", "pooling": "mean",
                         "output_dir": tmp_path / "run"}).output_dir
    with pytest.raises(PeftkitError, match=r"pooling mean\), which a plain transformers classifier cannot do"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_peft_method_without_a_merge_is_reported(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "peft:lily")
    with pytest.raises(PeftkitError, match="strategy peft:lily cannot be merged: This method is not supported for Lily"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_does_not_overwrite_by_accident(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "ia3")
    with pytest.raises(PeftkitError, match="is the run itself"):
        merge_run(run, run, overwrite=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder of the user's own files is never emptied, flag or not
        with pytest.raises(PeftkitError, match="holds no peftkit merged checkpoint .keep.txt.: peftkit never deletes"):
            merge_run(run, taken, overwrite=overwrite)
    assert (taken / "keep.txt").read_text() == "mine"
    merged = tmp_path / "merged"
    merge_run(run, merged)
    with pytest.raises(PeftkitError, match="holds a finished peftkit merged checkpoint: pass --overwrite"):
        merge_run(run, merged)
    merge_run(run, merged, overwrite=True)  # an earlier merge is replaced
    assert sorted(p.name for p in merged.iterdir()) == json.loads((merged / "merge.json").read_text())["files"]


def test_merge_says_and_chooses_the_dtype_it_saves(tmp_path, data_dir):
    """A bf16 run merges into bf16 weights by default, and says so; --dtype fp32 saves fp32."""
    run = peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 32,
                         "max_eval_samples": 16, "epochs": 1, "select": "last", "strategy": "lora", "dtype": "bf16",
                         "precision": "bf16", "output_dir": tmp_path / "run"}).output_dir
    said = invoke("merge", "--run", run, "--output", tmp_path / "default")
    assert said.exit_code == 0, said.output
    assert "saved in bfloat16 (the run's weights dtype; --dtype fp32 for full precision)" in said.stdout
    assert json.loads((tmp_path / "default" / "merge.json").read_text())["dtype"] == "bfloat16"
    assert invoke("merge", "--run", run, "--output", tmp_path / "fp32", "--dtype", "fp32").exit_code == 0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "fp32").dtype == torch.float32
    assert_clean_failure(invoke("merge", "--run", run, "--output", tmp_path / "x", "--dtype", "int8"),
                         "--dtype must be one of fp32, bf16, fp16", tmp_path / "x")
