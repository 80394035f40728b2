"""The strategy registry. Importing this package registers every built-in strategy without
importing torch or PEFT (their modules import them when a model is adapted); the generated
`peft:<method>` strategies register on first use (`load_peft_registry`)."""

from peftkit.strategies.base import STRATEGIES, Strategy, TaskView, register
from peftkit.strategies.registry import build_strategy, load_peft_registry

__all__ = ["STRATEGIES", "Strategy", "TaskView", "build_strategy", "load_peft_registry", "register"]
