"""The strategy registry. Importing this package registers every built-in strategy without
importing torch or PEFT (their modules import them when a model is adapted); the generated
`peft:<method>` strategies register on first use (`load_peft_registry`)."""

from peftkit.strategies.base import STRATEGIES, Strategy, TaskView, register
from peftkit.strategies.registry import build_strategy, load_peft_registry
from peftkit.strategies import adapters, freezing, lora, peft_methods  # noqa: F401  (registration side effect)

__all__ = ["STRATEGIES", "Strategy", "TaskView", "build_strategy", "load_peft_registry", "register"]
