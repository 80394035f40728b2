"""Trainable-parameter counts of every registered strategy on one model (`peftkit strategies --model`)."""

from __future__ import annotations

import copy

import torch

from peftkit.errors import PeftkitError
from peftkit.measure import count_parameters
from peftkit.models import load_model_config, load_tokenizer, resolve_model
from peftkit.strategies import build_strategy
from peftkit.tasks import Task


def count_for_model(model_name: str, names: list[str], task: Task, num_labels: int = 2) -> dict[str, tuple[int, int] | None]:
    """{strategy: (trainable, total)} for `names` on `task`'s model, each applied to its own
    copy of the model (loaded once; quantizing strategies load their own 4-bit copy); None for
    a strategy that cannot train this model for this task with its default options."""
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    model_config = load_model_config(source)
    info = {"label_names": [f"label_{i}" for i in range(num_labels)]}
    counts: dict[str, tuple[int, int] | None] = {}
    plain = task.load_model(source, info, tokenizer)
    for name in names:
        try:
            strategy = build_strategy(name)
            strategy.check(model_config, task)
            task.check_strategy(strategy)
            quantization = strategy.quantization_config(torch.float32)
            model = copy.deepcopy(plain) if quantization is None else task.load_model(source, info, tokenizer, quantization)
            counts[name] = count_parameters(strategy.apply(model, task))
        except PeftkitError:
            counts[name] = None
    return counts
