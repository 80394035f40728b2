"""The task registry: what is learned (classification, instruction tuning, ...).

A task kind is one file in this package with one `@register_task` class: which model class
loads the model, the PEFT task type, which modules train beside the strategy, the data it
needs, preprocessing, the trainer, metrics (and which one selects) and prediction. Built-in
data sets (`sst2`, `sst2-chat`, `gsm8k`, ...) map a name to a kind and its columns, so
`--task` takes either. Importing this package registers every built-in kind; it imports no
torch or transformers (a task's heavy imports happen when it runs).
"""

from __future__ import annotations

from peftkit.tasks.base import (DATASETS, TASKS, BuiltinDataset, Task, headline_metric, load_data, register_task,
                                resolve_task, task_for_model)
from peftkit.tasks import classification, grpo, preference, qa, reward, seq2seq, sft, token_classification  # noqa: F401  (registration side effect)

__all__ = ["DATASETS", "TASKS", "BuiltinDataset", "Task", "headline_metric", "load_data", "register_task",
           "resolve_task", "task_for_model"]
