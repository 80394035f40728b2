"""A run's configuration: the common options composed with its task's option group.

`RunConfig` is the type every layer below the resolution reads; `config_class` makes the one
class per task group (`RunConfig` + `SftOptions`, ...), so a run's config has exactly the
fields its task reads. `peftkit.resolve.make_config` is the only maker of a RunConfig: it
checks names and combinations against the registries and attaches the resolved task and
strategy, which the config hands on (`task_kind`, `strategy.build()`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from pydantic import PrivateAttr

from peftkit import precision
from peftkit.options.common import CommonOptions, StrategySpec
from peftkit.options.tasks import TaskOptions


class RunConfig(CommonOptions):
    """Everything one training run needs (the common fields here, the task's in its group)."""

    _task: Any = PrivateAttr(default=None)
    _build_strategy: Callable[[str, dict[str, Any]], Any] | None = PrivateAttr(default=None)

    def resolved(self, task: Any, build_strategy: Callable[[str, dict[str, Any]], Any]) -> RunConfig:
        """Attach the run's task and its strategy's builder (peftkit.resolve does, once checked)."""
        self._task = task
        self._build_strategy = build_strategy
        return self

    @property
    def task_name(self) -> str:
        return self.task or "classification"

    @property
    def task_kind(self) -> Any:
        """The registered Task this run trains (`peftkit.tasks`)."""
        if self._task is None:
            raise RuntimeError("this RunConfig was not resolved: make it with peftkit.resolve.make_config")
        return self._task

    def build_strategy(self) -> Any:
        """The run's Strategy, built from its name and options."""
        if self._build_strategy is None:
            raise RuntimeError("this RunConfig was not resolved: make it with peftkit.resolve.make_config")
        return self._build_strategy(self.strategy.name, self.strategy.options)

    @property
    def lr(self) -> float:
        """The learning rate in force: the one given, else the strategy's own default."""
        return self.learning_rate if self.learning_rate is not None else self.build_strategy().default_lr

    def weights_dtype(self, device: str | None = None) -> str:
        """`dtype` resolved on `device` (default: this machine's): auto is bf16 where the device
        computes bf16 natively, fp32 elsewhere, and there follows an explicit `precision` (never
        contradicts it)."""
        if self.dtype != "auto":
            return self.dtype
        native = "bf16" if precision.native_precision(device) == "bf16" else "fp32"
        return native if native == "fp32" or self.precision == "auto" else self.precision

    def compute_precision(self, device: str | None = None) -> str:
        """`precision` resolved on `device`: auto follows a half-precision `dtype`, else is the
        device's native precision (`peftkit.precision.native_precision`)."""
        if self.precision != "auto":
            return self.precision
        if self.dtype in ("bf16", "fp16"):
            return self.dtype
        return precision.native_precision(device)


@functools.cache
def config_class(group: type[TaskOptions]) -> type[RunConfig]:
    """The RunConfig of runs whose task reads `group`: the common fields, then the group's."""
    if group is TaskOptions:
        return RunConfig
    return type(f"RunConfig[{group.__name__}]", (group, RunConfig), {"__module__": __name__})


__all__ = ["RunConfig", "StrategySpec", "config_class"]
