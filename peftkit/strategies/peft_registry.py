"""`peft:<method>`: one strategy per method in PEFT's own config registry (peft:loha,
peft:vera, ...) without a strategy of its own, generated from the PEFT config's fields.
Importing this module imports PEFT and registers them all; `build_strategy` imports it the
first time a `peft:` name is asked for, so a run that uses none never pays for it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, ClassVar

from peft import TaskType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from peftkit.anatomy import inspect_model
from peftkit.errors import PeftkitError
from peftkit.strategies.base import TaskView, register
from peftkit.strategies.peft_base import PeftStrategy, first_line, layer_targets
from peftkit.strategies.peft_methods import _check_takes_key_value_cache

if TYPE_CHECKING:
    from torch import nn



# Config fields peftkit sets itself (task type, head, the model's sizes) or that describe
# a saved adapter rather than choose the method's behaviour.
INTERNAL_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "modules_to_save", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "tokenizer_name_or_path", "tokenizer_kwargs",
}
# PEFT types with a first-class strategy (lora, ia3, prompt-tuning, prefix-tuning, p-tuning).
DEDICATED = {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}
# Methods that cannot train here, and why.
UNSUPPORTED = {
    "ADALORA": "AdaLoRA reallocates ranks through update_and_allocate() after every optimizer step, "
               "which the Trainer does not call; use lora",
    "MULTITASK_PROMPT_TUNING": "it needs a task id with every example",
    "POLY": "it needs a task id with every example",
    "SHADOW": "PEFT's shadow layers fail in the forward pass of a sequence classifier",
}
PREFIX_LIKE = {"PREFIX_TUNING", "CARTRIDGE"}  # PEFT feeds these to the model as past_key_values


@dataclasses.dataclass
class PeftMethod(PeftStrategy):
    """Base of the generated `peft:<method>` strategies: the options are the PEFT config's
    own fields; `target_modules="auto"` means the layers' linear projections, as for lora.
    Options are validated when the strategy is built, under the causal-LM task type (which
    every method accepts; CPT accepts no other); the run's own task type applies when it runs."""

    default_lr = 1e-3  # LoRA's rate; methods with very few parameters (vera, fourierft) may want more
    # Less-used methods also signal a missing option or an unfit model with these.
    config_errors = (ValueError, TypeError, NotImplementedError)
    config_type: ClassVar[type]
    peft_type: ClassVar[str]
    unsupported: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        """Reject a method that cannot work here, and let PEFT validate the options now,
        before any weights load."""
        if self.unsupported:
            raise PeftkitError(f"strategy {self.name} cannot train here: {self.unsupported}")
        self._build(target_modules=None, head=None, task_type="CAUSAL_LM")

    def check(self, model_config: Any, task: TaskView | None = None) -> None:
        if self.peft_type in PREFIX_LIKE:
            _check_takes_key_value_cache(self.name, model_config)

    def check_task(self, task: TaskView) -> None:
        if not task.pretrained_head and not _has_modules_to_save(self.config_type):
            raise PeftkitError(f"strategy {self.name} cannot train task '{task.name}': its config has no "
                               "modules_to_save, so the new task head would stay at its random initialization")
        self._build(target_modules=None, head=None, task_type=task.peft_task_type)  # e.g. CPT takes causal LMs only

    def peft_config(self, model: nn.Module, task: TaskView) -> Any:
        targets = getattr(self, "target_modules", None)
        if targets == "auto" and self.peft_type == "LN_TUNING":  # it trains norms, not projections
            targets = _layer_norms(model)
        return self._build(layer_targets(model, targets), list(task.trained_beside(model)) or None,
                           task.peft_task_type)

    def _build(self, target_modules: Any, head: list[str] | None, task_type: str) -> Any:
        options = self.options()
        if "target_modules" in options:
            options["target_modules"] = target_modules
        extra = {"modules_to_save": head} if _has_modules_to_save(self.config_type) else {}
        try:
            return self.config_type(task_type=TaskType[task_type], **extra, **options)
        except self.config_errors as err:
            raise PeftkitError(f"strategy {self.name}: {first_line(err)}") from None


def _layer_norms(model: nn.Module) -> list[str]:
    """The normalization layers inside a transformer layer (LayerNorm, RMSNorm, ...), as paths
    relative to the layer: what LN-tuning trains."""
    anatomy = inspect_model(model)
    layer = model.get_submodule(f"{anatomy.layers_prefix}.0")
    return [name for name, module in layer.named_modules() if name and "norm" in type(module).__name__.lower()]


def _register_peft_methods() -> None:
    """One `peft:<method>` strategy per PEFT method without a dedicated strategy."""
    for peft_type, config_type in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if peft_type.value in DEDICATED:
            continue
        hints = typing.get_type_hints(config_type)
        fields = [f for f in dataclasses.fields(config_type) if f.name not in INTERNAL_FIELDS and _plain_default(f)]
        label = config_type.__name__.removesuffix("Config")
        namespace = {
            "__doc__": f"PEFT's {label} method; the options are the fields of peft.{config_type.__name__}.",
            "__module__": __name__,
            "config_type": config_type,
            "peft_type": peft_type.value,
            "unsupported": UNSUPPORTED.get(peft_type.value),
        }
        namespace["trains"] = f"{label} (PEFT)" + (" - unsupported" if namespace["unsupported"] else "")
        options = [(f.name, hints[f.name], _option_field(f)) for f in fields]
        register(f"peft:{peft_type.value.lower()}")(
            dataclasses.make_dataclass(f"Peft{label}", options, bases=(PeftMethod,), namespace=namespace)
        )


def _option_field(field: dataclasses.Field) -> dataclasses.Field:
    """The option's default: PEFT's own, except "auto" for target_modules."""
    if field.name == "target_modules":
        return dataclasses.field(default="auto")
    if field.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=field.default_factory)
    return dataclasses.field(default=field.default)


def _plain_default(field: dataclasses.Field) -> bool:
    """Options are recorded in run.json: skip fields whose default is not plain data (e.g.
    LoRA's runtime_config object)."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return default is None or isinstance(default, (bool, int, float, str, list, dict))


def _has_modules_to_save(config_type: type) -> bool:
    """Whether a method's config can train extra modules (a new task head) beside it."""
    return any(f.name == "modules_to_save" for f in dataclasses.fields(config_type))


_register_peft_methods()
