"""Where things are in a task model: the layer stack, the layers' parts, and the task head.

One generic mechanism for every architecture: the layer stack is the `nn.ModuleList` with
`config.num_hidden_layers` entries; the head is every top-level child that is not the base
model (`classifier` for BERT, `score` for Llama); parameters registered before the stack are
the embeddings, those after it (final norm, pooler) sit on top of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from torch import nn

REGIONS = ("embeddings", "layer", "top", "head")


@dataclass(frozen=True)
class Anatomy:
    """Names of the parts of a task model, computed once from the module tree."""

    layers_prefix: str          # e.g. "bert.encoder.layer"
    num_layers: int
    head_modules: tuple[str, ...]   # e.g. ("classifier",)
    embedding_params: frozenset[str]
    layer_linear_suffixes: tuple[str, ...]  # Linear paths inside one layer, e.g. "attention.self.query"
    # the head reads every token's hidden state: a token classifier, a span (QA) head, or a decoder's sequence
    # classifier (`score`), which scores every position and then picks the last real one
    head_scores_every_token: bool = False

    def layer_index(self, param_name: str) -> int | None:
        """The index of the layer a parameter belongs to, or None outside the stack."""
        match = re.match(re.escape(self.layers_prefix) + r"\.(\d+)\.", param_name)
        return int(match.group(1)) if match else None

    def is_head(self, param_name: str) -> bool:
        return is_under(param_name, self.head_modules)

    def region(self, param_name: str) -> str:
        """One of REGIONS: where in the model this parameter sits."""
        if self.is_head(param_name):
            return "head"
        if self.layer_index(param_name) is not None:
            return "layer"
        return "embeddings" if param_name in self.embedding_params else "top"


def head_is_one_linear(model: nn.Module) -> bool:
    """Whether the task head is one linear layer over one vector per position or example. A
    head that reads the sequence itself (RoBERTa's and ELECTRA's take the first token inside
    the head) or is several modules joined in the model's forward (DistilBERT's pre-classifier,
    ReLU and classifier; DeBERTa-v2's pooler and classifier) is not: cached features and mean
    pooling, which feed the head a vector of their own, apply only to a one-linear head."""
    from torch import nn

    heads = inspect_model(model).head_modules
    return len(heads) == 1 and isinstance(model.get_submodule(heads[0]), nn.Linear)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_under(name: str, modules: tuple[str, ...]) -> bool:
    """Whether a parameter or module name lies inside one of `modules` (or is one of them)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def inspect_model(model: nn.Module) -> Anatomy:
    """Find the layer stack, embeddings and head of a (not yet wrapped) task model."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    from torch import nn

    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if num_layers is not None:
        stacks = [(n, m) for n, m in stacks if len(m) == num_layers]
    if not stacks:
        raise PeftkitError(
            f"cannot find the layer stack of {type(model).__name__}: looked for an nn.ModuleList "
            f"with config.num_hidden_layers={num_layers} entries"
        )
    prefix, stack = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))

    base_name = getattr(model, "base_model_prefix", "")
    stack_names = [n for n, _ in stacks]
    # the head: top-level modules outside the base model; where the base has no module of its
    # own (T5ForConditionalGeneration: shared embeddings, encoder, decoder, lm_head side by
    # side), those holding a layer stack or being the embeddings are the base
    head = tuple(
        name for name, child in model.named_children()
        if name != base_name and any(True for _ in child.parameters())
        and not any(s.startswith(name + ".") for s in stack_names) and not isinstance(child, nn.Embedding)
    )
    if not head:
        raise PeftkitError(f"cannot find the task head of {type(model).__name__}: no top-level module besides '{base_name}'")

    embeddings, seen_stack = set(), False
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            seen_stack = True
        elif not seen_stack and not any(name.startswith(h + ".") for h in head):
            embeddings.add(name)

    # an encoder-decoder has two stacks whose layers differ (the decoder's has cross-attention,
    # and its feed-forward sits one sub-layer later): a layer's projections are both stacks'
    blocks = [m[0] for _, m in stacks] if getattr(model.config, "is_encoder_decoder", False) else [stack[0]]
    suffixes = tuple(dict.fromkeys(
        name for block in blocks for name, module in block.named_modules()
        if name and _is_linear(module)
    ))
    every_token = head[0] == "score" or type(model).__name__.endswith(("ForTokenClassification", "ForQuestionAnswering"))
    return Anatomy(prefix, len(stack), head, frozenset(embeddings), suffixes, every_token)


@dataclass(frozen=True)
class Stack:
    """One layer stack: its module path and layer count."""

    prefix: str
    layers: int

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."


def encoder_decoder_stacks(model: nn.Module) -> tuple[Stack, Stack]:
    """An encoder-decoder's two layer stacks, the encoder's and the decoder's (`encoder.block`
    and `decoder.block` in T5, `model.encoder.layers` and `model.decoder.layers` in BART): the
    largest module list whose parent is named `encoder`, and `decoder`. `inspect_model` names
    only the larger (the decoder); what acts on every layer (adapters, the estimate) asks here."""
    from torch import nn

    base = unwrap_peft(model)
    lists = [(name, module) for name, module in base.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0 and "." in name]
    found = []
    for side in ("encoder", "decoder"):
        candidates = [(name, module) for name, module in lists if name.split(".")[-2] == side]
        if not candidates:
            raise PeftkitError(f"cannot find the {side}'s layer stack of {type(base).__name__}: looked for a module list "
                               f"inside a module named '{side}'")
        name, module = max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))
        found.append(Stack(name, len(module)))
    return found[0], found[1]


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' 4/8-bit layers subclass it) and GPT-2's transposed Conv1D."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))
