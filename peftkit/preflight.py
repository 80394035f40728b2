"""Checks of a run's options against its model and device, made from the model's config
alone (no weights load): what the architecture or the machine cannot honour fails here in one
line, instead of as a traceback inside training or, worse, a run that records an option it
never could use."""

from __future__ import annotations

from typing import Any

from peftkit.errors import PeftkitError

# the config fields in which architectures state their longest input (absolute or learned
# positions); relative-position models (T5) state none and take any length
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_positions", "n_ctx")


def positions(model_config: Any) -> int | None:
    """The most tokens the model can take at once, where its config says (None: no limit)."""
    for name in POSITION_FIELDS:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_against_model(config: Any, model_config: Any) -> None:
    """`max_length`, and the longest generation (prompt and new tokens for a decoder-only
    model), within the model's positions."""
    limit = positions(model_config)
    if limit is None:
        return
    if config.max_length > limit:
        raise PeftkitError(f"max_length {config.max_length} is more than {config.model} has positions ({limit}, "
                           f"its config's max_position_embeddings): pass --max-length {limit} or less")
    task = config.task_kind
    if task.generates_text and not getattr(model_config, "is_encoder_decoder", False) and config.max_new_tokens >= limit:
        raise PeftkitError(f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt in {config.model}'s "
                           f"{limit} positions: choose fewer, e.g. --set max_new_tokens={min(256, limit // 4)}")


def check_device(config: Any, device: str) -> None:
    """A precision the device cannot train in: fp16 mixed precision (Trainer's GradScaler)
    needs a CUDA GPU."""
    half = {config.compute_precision(device), config.weights_dtype(device)}
    if device == "cpu" and "fp16" in half:
        raise PeftkitError("fp16 mixed precision needs a CUDA GPU, and this run is on the CPU: use "
                           "--precision bf16 (fast on CPUs with AVX512-BF16 or AMX) or --precision fp32")
