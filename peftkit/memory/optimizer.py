"""The optimizer's states for the trainable tensors, per tensor: AdamW's two fp32 moments
(also paged 32-bit AdamW); bitsandbytes' 8-bit AdamW (plain or paged) one byte per state and
an fp32 absmax per 256-value block for tensors of 4,096 values or more, fp32 states below that;
Adafactor (no first moment) one fp32 value per row and per column of a matrix, per value of a
vector; plain SGD none."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit", "sgd", "adafactor")
BNB_MIN_8BIT_SIZE, BNB_STATE_BLOCK = 4096, 256  # bitsandbytes' 8-bit optimizers: smaller tensors keep fp32 states


def optimizer_bytes(model: nn.Module, optimizer: str) -> int:
    """The optimizer's state for the trainable tensors of `model`, in bytes."""
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        n = param.numel()
        if optimizer in ("adamw", "paged-adamw-32bit"):
            total += 8 * n
        elif optimizer in ("adamw-8bit", "paged-adamw-8bit"):
            total += 2 * n + 2 * 4 * -(-n // BNB_STATE_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n
        elif optimizer == "adafactor":
            total += 4 * (param.shape[-2] + param.shape[-1] if param.dim() >= 2 else n)
    return total
