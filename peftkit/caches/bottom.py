"""The frozen bottom of a model, computed once and replayed.

When every trainable parameter sits in layer K or above (partial freezing of the bottom
layers, adapters on the top layers only) and nothing in the embeddings and the layers below
K is stochastic in training mode (no dropout), layer K-1's output for an example is the same
in every step of every epoch. It is computed once (no gradients, batches sorted by length),
kept per example without padding, and during training the bottom K layers replay it: layers
0..K-2 pass their input through and layer K-1 returns the stored rows, padded to the batch.
The embeddings still run (a lookup) and the model still builds its masks and position
embeddings, so the layers above see exactly the inputs they would otherwise see.

With dropout below layer K (BERT-style encoders train with it) every step sees different
bottom outputs, so caching would change what is learned: the bottom then runs as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from peftkit.anatomy import Anatomy, inspect_model

INDEX_COLUMN = "example_index"  # which stored rows a batch replays


def frozen_bottom(model: nn.Module) -> int:
    """K, the number of bottom layers whose output can be cached: every trainable parameter
    sits in layer K or above (or in the head and what sits above the stack), and nothing
    below layer K is stochastic. 0 when there is nothing to cache."""
    from peft import PeftModel

    if isinstance(model, PeftModel):  # PEFT's wrappers may change inputs (virtual tokens): never replay under them
        return 0
    anatomy = inspect_model(model)
    bottom = anatomy.num_layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        region = anatomy.region(name)
        if region == "embeddings":
            return 0
        if region == "layer":
            bottom = min(bottom, anatomy.layer_index(name))
    if bottom == 0 or bottom == anatomy.num_layers or _stochastic_below(model, anatomy, bottom):
        return 0  # nothing frozen below, or only the head trains (linear probing caches the head's inputs instead)
    return bottom


def _stochastic_below(model: nn.Module, anatomy: Anatomy, bottom: int) -> bool:
    """Dropout anywhere outside the layers that train and the head: a module, a module's float
    dropout rate (attention implementations read one), or a config rate a forward may read."""
    kept = tuple(f"{anatomy.layers_prefix}.{i}" for i in range(bottom, anatomy.num_layers)) + anatomy.head_modules
    for name, module in model.named_modules():
        if any(name == k or name.startswith(k + ".") for k in kept):
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        if any(_positive_rate(key, value) for key, value in vars(module).items()):
            return True
    config = getattr(model, "config", None)
    return any(_positive_rate(key, value) for key, value in (config.to_dict() if config else {}).items()
               if "classifier" not in key)


def _positive_rate(key: str, value: Any) -> bool:
    return "dropout" in key and isinstance(value, float) and value > 0


@dataclass
class BottomOutputs:
    """Layer K-1's output for every example, padding removed: `rows` holds them end to end,
    `offsets[i]:offsets[i+1]` are example i's tokens in position order."""

    rows: torch.Tensor
    offsets: torch.Tensor
    output_arity: int  # 0: the layer returns a tensor; n: a tuple of n, the hidden states first

    @classmethod
    def joined(cls, parts: list[BottomOutputs]) -> BottomOutputs:
        """One store for several splits, their examples numbered one after another."""
        offsets, shift = [parts[0].offsets[:1]], 0
        for part in parts:
            offsets.append(part.offsets[1:] + shift)
            shift += int(part.offsets[-1])
        return cls(torch.cat([p.rows for p in parts]), torch.cat(offsets), parts[0].output_arity)

    def batch(self, indices: torch.Tensor, attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The stored rows of these examples, zero-padded where the attention mask has padding."""
        pieces = [self.rows[self.offsets[i]:self.offsets[i + 1]] for i in indices.tolist()]
        out = torch.zeros(*attention_mask.shape, self.rows.shape[-1], dtype=like.dtype, device=like.device)
        out[attention_mask.bool()] = torch.cat(pieces).to(like.device, like.dtype)
        return out


def compute_bottom_outputs(model: nn.Module, bottom: int, examples: list[Any], collate: Any,
                           batch_size: int) -> BottomOutputs:
    """Run the model without gradients over `examples` (sorted by length, in evaluation mode)
    and keep layer `bottom - 1`'s output at the real tokens."""
    anatomy = inspect_model(model)
    layer = model.get_submodule(f"{anatomy.layers_prefix}.{bottom - 1}")
    captured: list[Any] = []
    hook = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    order = sorted(range(len(examples)), key=lambda i: examples[i]["length"])
    per_example: list[torch.Tensor | None] = [None] * len(examples)
    arity = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                batch = collate([examples[i] for i in chosen])
                batch.pop("labels", None)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                captured.clear()
                model(**batch)
                output = captured[0]
                arity = len(output) if isinstance(output, tuple) else 0
                hidden = (output[0] if arity else output).float().cpu()
                mask = batch["attention_mask"].bool().cpu()
                for row, i in enumerate(chosen):
                    per_example[i] = hidden[row][mask[row]]
    finally:
        hook.remove()
        model.train(was_training)
    lengths = torch.tensor([0] + [len(x) for x in per_example])
    return BottomOutputs(torch.cat(per_example), lengths.cumsum(0), arity)


@dataclass
class BottomReplay:
    """Replays stored bottom outputs inside a model's forward pass. The batch's example
    indices and attention mask are handed over with `use()` before each forward."""

    model: nn.Module
    bottom: int
    outputs: BottomOutputs
    _current: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def use(self, indices: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._current = (indices, attention_mask)

    @contextmanager
    def active(self) -> Iterator[None]:
        """While active, the bottom layers replay instead of computing."""
        anatomy = inspect_model(self.model)
        layers = [self.model.get_submodule(f"{anatomy.layers_prefix}.{i}") for i in range(self.bottom)]
        for i, layer in enumerate(layers):
            layer.forward = self._replay if i == self.bottom - 1 else self._pass_through
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward  # the class's own forward again

    def _shaped(self, hidden: torch.Tensor) -> Any:
        arity = self.outputs.output_arity
        return (hidden,) + (None,) * (arity - 1) if arity else hidden

    def _pass_through(self, *args: Any, **kwargs: Any) -> Any:
        return self._shaped(args[0] if args else kwargs["hidden_states"])

    def _replay(self, *args: Any, **kwargs: Any) -> Any:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if self._current is None or self._current[1].shape != hidden_states.shape[:2]:
            raise RuntimeError("bottom replay needs this batch's example indices: call use() before the forward pass")
        indices, attention_mask = self._current
        return self._shaped(self.outputs.batch(indices, attention_mask, like=hidden_states))
