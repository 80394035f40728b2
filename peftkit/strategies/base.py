"""The strategy interface and its registry.

A strategy is a dataclass whose fields are its options. The registry is the single source
for the CLI's `--strategy` choices, the `peftkit strategies` table and the tests; options
from `--set`, recipes and the Python API all pass through `build_strategy`, so they share
one schema and one validation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol


from peftkit.anatomy import Anatomy, inspect_model
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    import torch
    from torch import nn


STRATEGIES: dict[str, type[Strategy]] = {}


class TaskView(Protocol):
    """What a strategy asks of the task it trains for (every `peftkit.tasks.Task` is one):
    which modules train beside it (a new classifier head, or nothing for a causal LM's own
    output layer), PEFT's task type, and whether the task keeps the model's own head and
    generates text. Strategies own this interface, so they import nothing of the tasks."""

    name: str
    peft_task_type: str
    pretrained_head: bool
    generates_text: bool

    def trained_beside(self, model: nn.Module) -> tuple[str, ...]: ...

# Parameter-name parts that take no weight decay: biases and norms (as transformers' Trainer
# does), and the scales that mean "unchanged" at 1, PEFT's DoRA magnitudes and IA3 vectors,
# which decay toward 0 would pull toward switching their layer off.
NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_",
                    "lora_magnitude_vector", "ia3_l")


def register(name: str):
    """Class decorator: make a Strategy dataclass available as `--strategy name`."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return wrap


@dataclasses.dataclass
class Strategy:
    """Base class: turns a loaded model into one whose trainable parameters are exactly
    what the strategy means. Subclasses are dataclasses; their fields are the options."""

    name: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    default_lr: ClassVar[float] = 5e-5
    # "whole-model" (save_pretrained), "trained-tensors" (only requires_grad), or "peft".
    saves: ClassVar[str] = "trained-tensors"
    # True when nothing below the task head trains: the head can learn from cached features.
    frozen_below_head: ClassVar[bool] = False
    # False when the strategy updates the base's own linear weights, which a 4-bit base cannot.
    quantizable_base: ClassVar[bool] = True
    # False for `none`: the model is evaluated as it is, nothing trains.
    trains_anything: ClassVar[bool] = True
    # Why `peftkit merge` cannot fold this strategy's training into the base weights (None: it can).
    merge_refusal: ClassVar[str | None] = (
        "only PEFT adapters (lora, dora, qlora, ia3, peft:<method>) fold into the base weights"
    )

    def check(self, model_config: Any, task: TaskView | None = None) -> None:
        """Reject an impossible (strategy, architecture) pair from the model's transformers
        config alone (and the task it trains for), before any weights load. Raises
        PeftkitError; the default accepts all."""

    def check_task(self, task: TaskView) -> None:
        """Refuse a task this strategy cannot train, before any weights load (default: none)."""

    def prepare_tokenizer(self, tokenizer: Any, model_config: Any) -> None:
        """Adjust the tokenizer the run trains with and saves (e.g. its padding side)."""

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        """Return the model ready to train (may be a wrapper such as a PeftModel). `task` says
        what trains beside the strategy (default: the task kind the model was built for)."""
        raise NotImplementedError

    def check_quantization(self, quantization: str) -> None:
        """Refuse a run-level 4-bit base (`quantization` nf4/fp4) this strategy cannot use."""
        if quantization == "none":
            return
        if self.quantization_config(None) is not None:
            raise PeftkitError(f"strategy '{self.name}' quantizes the base itself (its quant_type option): drop quantization")
        if not self.quantizable_base:
            raise PeftkitError(f"strategy '{self.name}' trains the base weights, which a 4-bit base cannot update: "
                               "set quantization none, or pick a strategy that adds weights (lora, adapter, ia3)")

    def quantization_config(self, compute_dtype: torch.dtype | None) -> Any | None:
        """The transformers quantization config this strategy itself demands of the base
        (qlora), or None. `compute_dtype` None means the run's default."""
        return None

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: AdamW with no weight decay on biases and norms (as Trainer does)."""
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if _skips_decay(name) else decay).append(param)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained weights in their smallest faithful form."""
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(directory / TRAINED_TENSORS))

    def load(self, base: nn.Module, directory: Path, task: TaskView) -> nn.Module:
        """Apply the strategy to a freshly loaded base, then put the saved tensors back."""
        from safetensors.torch import load_file

        model = self.apply(base, task)
        tensors = load_file(str(directory / TRAINED_TENSORS))
        missing = set(tensors) - {n for n, _ in model.named_parameters()}
        if missing:
            raise PeftkitError(f"{directory / TRAINED_TENSORS} has tensors the model lacks: {sorted(missing)[:3]}")
        model.load_state_dict(tensors, strict=False)
        return model

    def options(self) -> dict[str, Any]:
        """The option values, as plain data (for run.json and recipes)."""
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        """The names of the strategy's options (its dataclass fields), in order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def main_options(cls) -> str:
        """A short `name=default` summary of the options, for the strategies table."""
        parts = [f"{f.name}={_default(f)}" for f in dataclasses.fields(cls)]
        return ", ".join(parts) if parts else "-"


TRAINED_TENSORS = "trained_weights.safetensors"


def _skips_decay(name: str) -> bool:
    return any(marker in name for marker in NO_DECAY_MARKERS)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


__all__ = ["STRATEGIES", "Strategy", "TaskView", "Anatomy", "inspect_model", "register"]
