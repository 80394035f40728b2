"""Trainable-parameter counts of every registered strategy on one model (`peftkit strategies --model`)."""

from __future__ import annotations

from peftkit.errors import PeftkitError
from peftkit.measure import count_parameters
from peftkit.models import load_for_classification, load_model_config, load_tokenizer, resolve_model
from peftkit.strategies import STRATEGIES, build_strategy

import torch


def count_for_model(model_name: str, num_labels: int = 2) -> dict[str, tuple[int, int] | None]:
    """{strategy: (trainable, total)}, each strategy applied to a freshly loaded copy; None
    for a strategy that cannot train this model with its default options."""
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    model_config = load_model_config(source)
    labels = [f"label_{i}" for i in range(num_labels)]
    counts: dict[str, tuple[int, int] | None] = {}
    for name in sorted(STRATEGIES):
        try:
            strategy = build_strategy(name)
            strategy.check(model_config)
            model = load_for_classification(source, labels, tokenizer, strategy.quantization_config(torch.float32))
            counts[name] = count_parameters(strategy.apply(model))
        except PeftkitError:
            counts[name] = None
    return counts
