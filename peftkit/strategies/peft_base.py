"""The base of every strategy that is one PEFT config (lora, dora, qlora, ia3, prompt
learning, `peft:<method>`).

A subclass only says how to build its config from a loaded model; applying it
(`get_peft_model`), saving (PEFT's `adapter_config.json` + `adapter_model.safetensors`, the
task head included through `modules_to_save`), reloading (`PeftModel.from_pretrained`) and
merging are the same for all of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from peftkit.anatomy import inspect_model
from peftkit.errors import PeftkitError
from peftkit.strategies.base import Strategy, TaskView

if TYPE_CHECKING:
    from torch import nn



@dataclasses.dataclass
class PeftStrategy(Strategy):
    """A strategy backed by a PEFT config; the base model is frozen by PEFT, the head trains."""

    saves = "peft"
    merge_refusal = None  # PEFT folds the adapter into the base weights (`merge_and_unload`)
    # What PEFT raises when a config does not fit the model (targets that match nothing, sizes
    # that do not divide): the user's to fix, so reported in one line.
    config_errors: ClassVar[tuple[type[Exception], ...]] = (ValueError,)
    config_name: ClassVar[str] = ""  # the PEFT config class's name, e.g. "LoraConfig" (peft loads when used)

    @property
    def config_type(self) -> type:
        """The PEFT config class (generated `peft:<method>` strategies set it directly)."""
        import peft

        return getattr(peft, self.config_name)

    def config_options(self, model: nn.Module) -> dict[str, Any]:
        """The method's own PEFT config options for this model."""
        raise NotImplementedError

    def peft_config(self, model: nn.Module, task: TaskView) -> Any:
        """The PEFT config for this model: the task's PEFT task type, and what the task trains
        beside the strategy (a new head) in `modules_to_save`."""
        from peft import TaskType

        return self.config_type(task_type=TaskType[task.peft_task_type],
                                modules_to_save=list(task.trained_beside(model)) or None, **self.config_options(model))

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(model, task)
        try:
            return self.wrapped(get_peft_model(model, config))
        except self.config_errors as err:
            raise PeftkitError(f"{self.name}: {first_line(err)}") from None

    def wrapped(self, model: nn.Module) -> nn.Module:
        """The PeftModel as this method trains and reloads it (a method may adjust it)."""
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        """PEFT's adapter files; the base they name is portable (a packaged model's hub id,
        not this machine's folder: peftkit reloads from the run's own record)."""
        import json

        from peftkit.models import portable_name

        model.save_pretrained(directory)
        config_file = Path(directory) / "adapter_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if config.get("base_model_name_or_path"):
                config["base_model_name_or_path"] = portable_name(config["base_model_name_or_path"])
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _portable_model_card(Path(directory) / "README.md", portable_name)


    def load(self, base: nn.Module, directory: Path, task: TaskView) -> nn.Module:
        from peft import PeftModel

        return self.wrapped(PeftModel.from_pretrained(base, directory))


def _portable_model_card(path: Path, portable_name: Any) -> None:
    """The model card PEFT writes names the base as the adapter config does: a packaged
    model by its hub id, in `base_model` and in the `base_model:adapter:` tag."""
    if not path.is_file():
        return
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    base = card.data.base_model
    if not isinstance(base, str) or portable_name(base) == base:
        return
    card.data.base_model = portable_name(base)
    card.data.tags = [f"base_model:adapter:{card.data.base_model}" if tag == f"base_model:adapter:{base}" else tag
                      for tag in card.data.tags or []]
    card.save(str(path))


def layer_targets(model: nn.Module, target_modules: str | list[str] | None) -> str | list[str] | None:
    """`"auto"`: every linear projection inside a transformer layer (attention and MLP) of
    whatever architecture is loaded, as paths relative to a layer; anything else passes through."""
    if target_modules == "auto":
        return list(inspect_model(model).layer_linear_suffixes)
    return target_modules


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (PEFT's messages can run to many lines)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
