"""The model an estimate counts: its transformers config (a config.json, a checkpoint, an alias
or a hub id) and the task model built from it on the meta device, with the strategy applied.
No weights load and no memory is allocated; torch and transformers are imported inside the
functions, so importing this module keeps them out of start-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from torch import nn


def load_config(model: str) -> Any:
    """A transformers config from a config.json file, a checkpoint directory, an alias or a hub id."""
    from transformers import AutoConfig  # kept out of start-up

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise PeftkitError(f"model config {path} does not exist: pass a config.json file, a checkpoint or an alias")
        return AutoConfig.for_model(**_read_json(path))
    from peftkit.models import resolve_model  # peftkit.models imports torch: kept out of start-up

    source = resolve_model(model)
    try:
        return AutoConfig.from_pretrained(source.path)
    except OSError as err:
        raise PeftkitError(f"cannot read the config of '{model}': {str(err).splitlines()[0][:160]}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PeftkitError(f"cannot read model config {path}: {err}") from None


def meta_model(config: Any, strategy: Any, task: Any, pooling: str = "model") -> nn.Module:
    """The task model on the meta device (no memory), with the strategy applied and its head
    reading the model through `pooling` (what cannot work fails here, in one line)."""
    import torch  # kept out of start-up, with transformers and peftkit.pooling (which imports torch)
    import transformers

    from peftkit.pooling import read_with

    with torch.device("meta"):
        plain = getattr(transformers, task.model_class).from_config(config)
        return read_with(pooling, plain, lambda model: strategy.apply(model, task))
