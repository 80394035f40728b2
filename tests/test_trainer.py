"""The trainer every task shares: evaluation keeps the data set's order even when training
groups batches by length (QA matches each prediction to its window by position)."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch import nn

from peftkit.resolve import make_config
from peftkit.trainer import timed_trainer


class EchoFirstToken(nn.Module):
    """Predicts each row's first input id, so the predictions show the order rows came in."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = input_ids[:, :1].float() * self.weight
        return {"loss": logits.sum() * 0, "logits": logits}


def test_evaluation_keeps_the_data_set_order_when_training_groups_by_length(tmp_path):
    lengths = [3, 9, 1, 7, 5, 2, 8, 4, 6, 10] * 3
    rows = Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)],
                              "attention_mask": [[1] * n for n in lengths], "labels": list(range(len(lengths))),
                              "length": lengths})

    def pad(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * (longest - len(f["input_ids"])) for f in features]),
                "attention_mask": torch.tensor([f["attention_mask"] + [0] * (longest - len(f["attention_mask"]))
                                                for f in features]),
                "labels": torch.tensor([f["labels"] for f in features])}

    config = make_config({"model": "tiny-bert", "task": "sst2", "eval_batch_size": 4, "group_by_length": True})
    trainer = timed_trainer(EchoFirstToken(), config, str(tmp_path), None, pad, evaluation=rows)
    predicted = trainer.predict(rows).predictions[:, 0]
    assert predicted.tolist() == list(range(len(lengths)))
