"""Sequence classification: tokenization (single text or a sentence pair), collator, metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from peftkit.bottom_cache import INDEX_COLUMN

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(dataset: Any, tokenizer: Any, text_columns: list[str], max_length: int, sort: bool = False) -> Any:
    """Token ids per example, truncated, not padded (the collator pads each batch to its
    longest); a `length` column lets the sampler group examples of similar length.
    `sort=True` orders by length, for evaluation: batches then carry almost no padding."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[c] for c in text_columns]
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    keep = {"labels"}
    encoded = dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep])
    return encoded.sort("length") if sort else encoded


class PadToLongest:
    """Pads each batch to its own longest sequence; passes only model inputs, labels and the
    example index that a replayed frozen bottom reads (peftkit.bottom_cache)."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict]) -> dict:
        keep = (*MODEL_INPUTS, "labels", INDEX_COLUMN)
        return self.pad([{k: v for k, v in f.items() if k in keep} for f in features])


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation of the argmax predictions."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }
