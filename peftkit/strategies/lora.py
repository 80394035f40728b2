"""LoRA and its variants through PEFT: lora, dora (weight-decomposed), qlora (4-bit NF4 base).

`target_modules="auto"` means every linear projection inside a transformer layer (attention
and MLP) of whatever architecture is loaded, found by `inspect_model`; the task head always
trains (PEFT's `modules_to_save`). Applying, saving, reloading and merging are `PeftStrategy`'s.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from peftkit.errors import PeftkitError
from peftkit.strategies.base import TaskView, register
from peftkit.strategies.peft_base import PeftStrategy, layer_targets

if TYPE_CHECKING:
    import torch
    from torch import nn



@register("lora")
@dataclasses.dataclass
class LoRA(PeftStrategy):
    """Low-rank updates on the attention/MLP projections (Hu et al. 2021)."""

    trains = "low-rank adapters + new head"
    default_lr = 1e-3
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"
    use_rslora: bool = False
    use_dora: bool = False

    config_name = "LoraConfig"

    def config_options(self, model: nn.Module) -> dict[str, Any]:
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_rslora=self.use_rslora,
                    target_modules=layer_targets(model, self.target_modules), use_dora=self.use_dora)


@register("dora")
@dataclasses.dataclass
class DoRA(LoRA):
    """LoRA with the weight split into magnitude and direction (Liu et al. 2024)."""

    trains = "magnitude + low-rank direction + new head"
    use_dora: bool = True

    def __post_init__(self) -> None:
        if not self.use_dora:
            raise PeftkitError("dora with use_dora=false would train plain LoRA: pick --strategy lora instead")


@register("qlora")
@dataclasses.dataclass
class QLoRA(LoRA):
    """LoRA on a frozen base quantized to 4-bit NF4 with bitsandbytes (Dettmers et al. 2023)."""

    trains = "low-rank adapters + new head (4-bit base)"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def quantization_config(self, compute_dtype: torch.dtype | None) -> Any:
        import torch

        from peftkit.models import four_bit_config

        dtype = compute_dtype if self.compute_dtype == "auto" else getattr(torch, self.compute_dtype)
        return four_bit_config(self.quant_type, self.double_quant, dtype or torch.float32)

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # Checkpointing, when asked for, is already on (non-reentrant, so inputs need no
        # gradient); PEFT's switch would turn it on again, reentrant, through a deprecated call.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, task)
