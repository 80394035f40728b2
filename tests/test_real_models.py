"""The packaged real models (MiniLM, SmolLM2-135M) on real SST-2 rows. Slower: marked `real`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import peftkit
from peftkit.cli import app
from peftkit.inference import evaluate_run

pytestmark = pytest.mark.real

# MiniLM: 6 layers, hidden 384, FFN 1536. LoRA r=8 on q,k,v,o (384->384), FFN in (384->1536)
# and out (1536->384): 4*8*768 + 2*8*1920 = 55,296 per layer; head 384*2+2 = 770.
MINILM_LORA = 6 * 55_296 + 770


def test_strategies_table_counts_for_minilm(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the table takes the terminal's width: rows at a known one
    result = CliRunner().invoke(app, ["strategies", "--model", "minilm"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 4}
    for name in ("full", "partial", "linear-probe", "bitfit", "lora", "dora", "qlora"):
        assert name in rows
    assert f"{MINILM_LORA:,}" in rows["lora"] and f"{MINILM_LORA:,}" in rows["qlora"]
    assert "770" in rows["linear-probe"]
    assert "22,713,986" in rows["full"]


def test_minilm_lora_learns_and_eval_reproduces(tmp_path, data_dir):
    result = peftkit.train({
        "model": "minilm", "task": "sst2", "data_dir": data_dir, "strategy": "lora",
        "max_train_samples": 512, "max_eval_samples": 200, "epochs": 1, "output_dir": tmp_path / "run",
    })
    assert result.record.trainable_params == MINILM_LORA
    assert result.metrics["accuracy"] > 0.6  # chance is ~0.5; 512 examples already get well past it
    reproduced = evaluate_run(result.output_dir)["metrics"]["accuracy"]
    assert round(reproduced, 4) == round(result.metrics["accuracy"], 4)
    # the adapter names its base portably (the hub id), not this machine's package folder
    adapter_config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_smollm2_trains_as_a_sequence_classifier(tmp_path, data_dir, strategy):
    result = peftkit.train({
        "model": "smollm2-135m", "task": "sst2", "data_dir": data_dir, "strategy": strategy,
        "max_train_samples": 16, "max_eval_samples": 16, "max_length": 48, "epochs": 1,
        "batch_size": 16, "output_dir": tmp_path / strategy,
    })
    record = result.record
    assert record.total_params > 130_000_000
    assert record.peak_memory_bytes > 0
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    reproduced = evaluate_run(result.output_dir)["metrics"]["accuracy"]
    assert round(reproduced, 4) == round(result.metrics["accuracy"], 4)
