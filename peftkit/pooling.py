"""Mean pooling for a model's task head: the masked mean of the last hidden states over real
tokens, in place of the model's own pooled vector (BERT's pooler on [CLS]).

Sentence-embedding models such as all-MiniLM-L6-v2 are trained to be read this way; their
[CLS] pooler output is barely trained. Installed with hooks, so the model's parameters and
their names stay as they are, and reapplying it on a reloaded base reproduces the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.anatomy import head_is_one_linear, inspect_model
from peftkit.errors import PeftkitError


class MeanPooling:
    """Hooks that feed the head the mean of the base model's last hidden states."""

    def __init__(self, model: nn.Module):
        anatomy = inspect_model(model)
        if anatomy.head_scores_every_token:
            raise PeftkitError(f"pooling=mean needs a head that reads one vector per example; "
                               f"{type(model).__name__} scores every token: use pooling=model")
        if not head_is_one_linear(model):
            raise PeftkitError(f"pooling=mean feeds the pooled vector to a head that is one linear layer; "
                               f"{type(model).__name__}'s head ({', '.join(anatomy.head_modules)}) reads the sequence "
                               "itself: use pooling=model")
        self.mask: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        model.register_forward_pre_hook(self._keep_mask, with_kwargs=True)
        model.get_submodule(model.base_model_prefix).register_forward_hook(self._keep_hidden)
        model.get_submodule(anatomy.head_modules[0]).register_forward_pre_hook(self._pooled_input)

    def _keep_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.mask = kwargs.get("attention_mask")

    def _keep_hidden(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.hidden = output[0]

    def _pooled_input(self, head: nn.Module, args: tuple) -> tuple[torch.Tensor] | None:
        """Replace the head's input inside a whole-model forward; a direct call of the head
        (training on cached features) has no hidden states waiting and passes through."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            return None
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if self.mask is None else self.mask
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1),)
