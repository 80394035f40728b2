"""How the task head reads the model (`pooling`, a run setting every strategy honours).

`model`: the head reads what the architecture gives it (BERT's pooler on [CLS], a decoder's
last token). `mean`: the masked mean of the base model's last hidden states over real tokens,
how sentence-embedding models such as all-MiniLM-L6-v2 are meant to be read (their [CLS]
pooler is barely trained). One reading for every row of a comparison, so that a row's score is
the strategy's and not the pooling's.

Installed with hooks on the base model and on the head's place in the model, after the
strategy has wrapped it: the parameters and their names stay as they are, PEFT's copy of the
head (`modules_to_save`) reads the pooled vector like the original, and reapplying it on a
reloaded run reproduces the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from peftkit.anatomy import head_is_one_linear, inspect_model, unwrap_peft
from peftkit.errors import PeftkitError

def read_with(pooling: str, plain: nn.Module, adapt: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """`adapt(plain)` (the strategy applied to a freshly loaded model, or a saved run loaded
    onto it), with its head reading the model through `pooling`; a pooling the plain model's
    head cannot take fails first, in one line."""
    reader = MeanPooling(plain) if pooling == "mean" else None
    model = adapt(plain)
    return reader.install(model) if reader is not None else model


class MeanPooling:
    """Hooks that feed the head the mean of the base model's last hidden states."""

    def __init__(self, plain: nn.Module):
        """Check, on the transformers model before any strategy wraps it, that its head takes
        one vector that a mean can replace, and remember where the base and the head sit."""
        anatomy = inspect_model(plain)
        if anatomy.head_scores_every_token:
            raise PeftkitError(f"pooling=mean needs a head that reads one vector per example; "
                               f"{type(plain).__name__} scores every token: use pooling=model")
        if not head_is_one_linear(plain):
            raise PeftkitError(f"pooling=mean feeds the pooled vector to a head that is one linear layer; "
                               f"{type(plain).__name__}'s head ({', '.join(anatomy.head_modules)}) reads the sequence "
                               "itself: use pooling=model")
        self.base_name, self.head_name = plain.base_model_prefix, anatomy.head_modules[0]
        self.mask: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def install(self, model: nn.Module) -> nn.Module:
        """Hook the model as trained (a PEFT wrapper is looked through): the base model keeps
        its attention mask and last hidden states, and the head's input becomes their mean.
        The base is hooked, not the top model, because PEFT's LoRA family calls the top
        model's `forward` directly, past its hooks."""
        inner = unwrap_peft(model)
        base = inner.get_submodule(self.base_name)
        base.register_forward_pre_hook(self._keep_mask, with_kwargs=True)
        base.register_forward_hook(self._keep_hidden)
        inner.get_submodule(self.head_name).register_forward_pre_hook(self._pooled_input)
        return model

    def _keep_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def _keep_hidden(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.hidden = output[0]

    def _pooled_input(self, head: nn.Module, args: tuple) -> tuple[torch.Tensor] | None:
        """Replace the head's input inside a whole-model forward; a direct call of the head
        (training on cached features) has no hidden states waiting and passes through."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            return None
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if self.mask is None else self.mask
        mask = mask[:, -hidden.shape[1]:]  # prefix tuning's mask also covers its virtual tokens, which have no state here
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1),)
