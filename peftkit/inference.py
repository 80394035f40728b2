"""Using a finished run: re-evaluate it on its validation split, or classify new text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftkit.data import load_data
from peftkit.errors import PeftkitError
from peftkit.run import load_run
from peftkit.tasks.classification import tokenize
from peftkit.trainer import evaluate

REPORTED = ("accuracy", "macro_f1", "mcc", "loss")


def evaluate_run(run_dir: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """Reload a run and recompute its validation metrics with the run's own data settings."""
    config, model, tokenizer, record = load_run(run_dir, data_dir=data_dir)
    data = load_data(config)
    eval_set = tokenize(data.validation, tokenizer, data.text_columns, config.max_length, sort=True)
    metrics = evaluate(model, config, eval_set, tokenizer)
    return {"metrics": {k: v for k, v in metrics.items() if k in REPORTED}, "recorded": record["metrics"]}


def predict(run_dir: Path, texts: list[str]) -> tuple[str, float]:
    """The predicted label of one input (a text, or a sentence pair) and its probability."""
    config, model, tokenizer, record = load_run(run_dir)
    expected = len(record["data"]["text_columns"])
    if len(texts) != expected:
        raise PeftkitError(f"this run classifies {expected} text(s) per example ({', '.join(record['data']['text_columns'])}); got {len(texts)}")
    inputs = tokenizer(*texts, truncation=True, max_length=config.max_length, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        probs = model(**inputs).logits.float().softmax(-1)[0]
    index = int(probs.argmax())
    return record["data"]["label_names"][index], float(probs[index])
