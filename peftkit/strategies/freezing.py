"""Strategies that train a subset of the model's own parameters: full, partial, linear-probe, bitfit.

One mechanism: each strategy is a predicate over (parameter name, its region in the model);
`apply` sets `requires_grad` from it. `full` and `partial` also offer discriminative learning
rates (layer-wise decay, a separate head rate).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit.anatomy import Anatomy, inspect_model, is_under
from peftkit.errors import PeftkitError
from peftkit.strategies.base import Strategy, TaskView, _skips_decay, register

if TYPE_CHECKING:
    from torch import nn



@dataclasses.dataclass
class Freezing(Strategy):
    """Base for strategies that choose which of the model's own parameters train."""

    def trainable(self, name: str, anatomy: Anatomy, beside: tuple[str, ...]) -> bool:
        """Whether a parameter trains; `beside` are the modules the task trains beside any strategy."""
        raise NotImplementedError

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        anatomy, beside = inspect_model(model), task.trained_beside(model)
        for name, param in model.named_parameters():
            param.requires_grad_(self.trainable(name, anatomy, beside))
        return model


@dataclasses.dataclass
class LayerwiseLR(Freezing):
    """Adds discriminative learning rates: layer i of L gets lr * layer_lr_decay**(L-1-i),
    the embeddings lr * layer_lr_decay**L, the head `head_lr` (default: lr)."""

    layer_lr_decay: float = 1.0
    head_lr: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.layer_lr_decay <= 1:
            raise PeftkitError(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        anatomy = inspect_model(model)
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = (self._lr_for(name, anatomy, lr), 0.0 if _skips_decay(name) else weight_decay)
            groups.setdefault(key, []).append(param)
        return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]

    def _lr_for(self, name: str, anatomy: Anatomy, lr: float) -> float:
        region = anatomy.region(name)
        if region == "head":
            return self.head_lr if self.head_lr is not None else lr
        if region == "layer":
            depth = anatomy.num_layers - 1 - anatomy.layer_index(name)
        elif region == "embeddings":
            depth = anatomy.num_layers
        else:
            depth = 0
        return lr * self.layer_lr_decay**depth


@register("full")
@dataclasses.dataclass
class Full(LayerwiseLR):
    """Every parameter trains."""

    trains = "every parameter"
    default_lr = 5e-5
    saves = "whole-model"
    quantizable_base = False

    def trainable(self, name: str, anatomy: Anatomy, beside: tuple[str, ...]) -> bool:
        return True

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory / "model")

    def load(self, base: nn.Module, directory: Path, task: TaskView) -> nn.Module:
        return type(base).from_pretrained(directory / "model", dtype=base.dtype)


@register("partial")
@dataclasses.dataclass
class Partial(LayerwiseLR):
    """Embeddings and bottom layers frozen; the top `trainable_layers` layers (or the
    explicit `layers`, e.g. "3-5" or [4, 5]) train, with the head and what sits above the
    stack (final norm, pooler)."""

    trains = "top layers + new head"
    default_lr = 1e-4
    quantizable_base = False
    trainable_layers: int | None = 2
    layers: str | list[int] | None = None
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.trainable_layers = None
            self.layers = parse_layer_ranges(self.layers)
        elif self.trainable_layers is None or self.trainable_layers < 0:
            raise PeftkitError("partial needs trainable_layers >= 0 or an explicit layers range such as layers=3-5")

    def chosen_layers(self, anatomy: Anatomy) -> set[int]:
        if self.layers is not None:
            out_of_range = [i for i in self.layers if i >= anatomy.num_layers]
            if out_of_range:
                raise PeftkitError(
                    f"partial layers {out_of_range} do not exist: the model has layers 0-{anatomy.num_layers - 1}"
                )
            return set(self.layers)
        return set(range(max(anatomy.num_layers - self.trainable_layers, 0), anatomy.num_layers))

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        self._chosen = self.chosen_layers(inspect_model(model))
        return super().apply(model, task)

    def trainable(self, name: str, anatomy: Anatomy, beside: tuple[str, ...]) -> bool:
        region = anatomy.region(name)
        if region == "layer":
            return anatomy.layer_index(name) in self._chosen
        if region == "embeddings":
            return self.train_embeddings
        if region == "head":  # a causal LM's own output layer trains only with the embeddings it is often tied to
            return is_under(name, beside) or self.train_embeddings
        return True


def parse_layer_ranges(spec: str | list[int]) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]; a list of ints passes through sorted."""
    if isinstance(spec, list):
        return sorted(set(spec))
    indices: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                indices.update(range(lo, hi + 1))
            else:
                indices.add(int(part))
        except ValueError:
            raise PeftkitError(f"cannot read layer range '{spec}': use e.g. layers=3-5 or layers=0,2,4") from None
    return sorted(indices)


@register("linear-probe")
@dataclasses.dataclass
class LinearProbe(Freezing):
    """Only the task head trains; the pretrained model is a frozen feature extractor."""

    trains = "a new task head only"
    default_lr = 5e-3
    frozen_below_head = True

    def trainable(self, name: str, anatomy: Anatomy, beside: tuple[str, ...]) -> bool:
        return is_under(name, beside)


@register("bitfit")
@dataclasses.dataclass
class BitFit(Freezing):
    """Only bias terms and the head train (Ben Zaken et al. 2022)."""

    trains = "biases + new head"
    default_lr = 1e-3

    def trainable(self, name: str, anatomy: Anatomy, beside: tuple[str, ...]) -> bool:
        return is_under(name, beside) or name.endswith(".bias")

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        """Refuses a model without bias terms (Llama, Mistral, ...), where bitfit would silently be a linear probe."""
        beside = task.trained_beside(model)
        if not any(n.endswith(".bias") and not is_under(n, beside) for n, _ in model.named_parameters()):
            raise PeftkitError(f"bitfit: {type(model).__name__} has no bias terms, so only the head would train: "
                               "pick linear-probe for that, or ia3/lora to train something small in the layers")
        return super().apply(model, task)


@register("none")
@dataclasses.dataclass
class NoTraining(Strategy):
    """Nothing trains: the pretrained model is evaluated as it is, the untuned baseline a
    comparison needs (for tasks whose output layer is the model's own, such as sft)."""

    trains = "nothing (evaluates the untuned model)"
    trains_anything = False
    saves = "nothing"
    merge_refusal = "nothing was trained"

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        """Nothing to save: the run's record and tokenizer say everything."""

    def load(self, base: nn.Module, directory: Path, task: TaskView) -> nn.Module:
        return self.apply(base, task)
