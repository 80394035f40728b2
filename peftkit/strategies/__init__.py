"""The strategy registry. Importing this package registers every built-in strategy."""

from peftkit.strategies.base import STRATEGIES, Strategy, apply_strategy, build_strategy, register
from peftkit.strategies import adapters, freezing, lora, peft_methods  # noqa: F401  (registration side effect)

__all__ = ["STRATEGIES", "Strategy", "apply_strategy", "build_strategy", "register"]
