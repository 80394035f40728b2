"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022), built in
because neither PEFT nor AdapterHub offers them on transformers 5.

An adapter is down-projection -> non-linearity -> dropout -> up-projection, added to the
output of one of a layer's projections. One mechanism for every variant and architecture:
the adapter becomes a child module named `adapter` of that projection (so its parameters are
named e.g. `bert.encoder.layer.0.output.dense.adapter.down.weight`, and `state_dict`, `.to()`
and the default trained-tensors save/load see it) and a forward hook adds its output. The
variant only decides where adapters go and what they read:

- houlsby: after the attention output projection and the feed-forward output projection,
  reading that projection's output (h = proj(x); h = h + adapter(h));
- pfeiffer: after the feed-forward output projection only, the same way;
- parallel: beside the feed-forward block: reads the block's input, and `scaling` times its
  output is added to the feed-forward output projection's output.

The projections are found by relative path inside each layer of the stack `inspect_model`
finds (`SITE_PATHS`); the base model's own parameters are never renamed or replaced, so a
4-bit (bitsandbytes) base works unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from peftkit.anatomy import Anatomy, inspect_model, is_under
from peftkit.errors import PeftkitError
from peftkit.strategies.base import Strategy, register, trained_beside
from peftkit.strategies.freezing import parse_layer_ranges

if TYPE_CHECKING:
    from peftkit.tasks.base import Task

# Relative paths inside one layer, per architecture family: (attention output projection,
# feed-forward output projection, feed-forward block whose input a parallel adapter reads).
# A negative index counts from the end of a ModuleList: T5's feed-forward is the last
# sub-layer (index 1 in the encoder, 2 in the decoder, after cross-attention).
SITE_PATHS: tuple[tuple[str, str, str], ...] = (
    ("attention.output.dense", "output.dense", "intermediate"),  # BERT, RoBERTa, DeBERTa
    ("self_attn.o_proj", "mlp.down_proj", "mlp"),  # Llama, Mistral, Qwen
    ("attn.c_proj", "mlp.c_proj", "mlp"),  # GPT-2 (projections are transformers Conv1D)
    ("layer.0.SelfAttention.o", "layer.-1.DenseReluDense.wo", "layer.-1.DenseReluDense"),  # T5
)

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclasses.dataclass(frozen=True)
class LayerSites:
    """The modules of one layer that adapters attach to."""

    attention_output: nn.Module
    ffn_output: nn.Module
    ffn_input: nn.Module


class Adapter(nn.Module):
    """down (width -> bottleneck) -> non-linearity -> dropout -> up (bottleneck -> width), times
    `scaling`. Its hooks add it to a projection's output; `reads_block_input` (parallel) makes
    it read the input a pre-hook captured from the feed-forward block instead of that output."""

    def __init__(self, width: int, bottleneck: int, non_linearity: str, dropout: float, scaling: float,
                 init: str, reads_block_input: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width, device=device, dtype=dtype)
        self.scaling = scaling
        self.reads_block_input = reads_block_input
        self._block_input: torch.Tensor | None = None
        # zero-up (down keeps nn.Linear's init): the adapted model equals the base at step 0.
        # bert: AdapterHub's "bert" init, normal(0, 0.02) weights and zero biases.
        if init == "bert":
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        else:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.dropout(self.act(self.down(x))))

    def capture_block_input(self, block: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the feed-forward block (parallel): keep its input for the projection hook."""
        self._block_input = args[0]

    def add_to_output(self, projection: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the projection: its output plus this adapter's output."""
        if self.reads_block_input:
            source, self._block_input = self._block_input, None
        else:
            source = output
        return output + self(source)


@register("adapter")
@dataclasses.dataclass
class BottleneckAdapter(Strategy):
    """Small bottleneck modules inserted into every chosen layer; the base is frozen, the
    adapters and the head train. bottleneck = `bottleneck_size`, else hidden // `reduction_factor`."""

    trains = "bottleneck adapters + new head"
    default_lr = 1e-3
    saves = "trained-tensors"
    variant: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    layers: str | list[int] | None = None
    init: Literal["zero-up", "bert"] = "zero-up"

    def __post_init__(self) -> None:
        if self.reduction_factor < 1 or (self.bottleneck_size is not None and self.bottleneck_size < 1):
            raise PeftkitError("adapter needs reduction_factor >= 1 and bottleneck_size >= 1 (or unset)")
        if not 0 <= self.dropout < 1:
            raise PeftkitError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.layers is not None:
            self.layers = parse_layer_ranges(self.layers)

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """Freeze everything but what the task trains beside (a new head), then add adapters to
        the chosen layers (in place)."""
        anatomy, beside = inspect_model(model), trained_beside(model, task)
        for name, param in model.named_parameters():
            param.requires_grad_(is_under(name, beside))
        stack = model.get_submodule(anatomy.layers_prefix)
        for index in self._chosen_layers(anatomy):
            layer = stack[index]
            for projection, block in self._placements(find_sites(model, layer)):
                self._attach(projection, block, next(p for p in layer.parameters() if p.is_floating_point()))
        return model

    def _attach(self, projection: nn.Module, block: nn.Module | None, like: torch.Tensor) -> None:
        """Add an adapter to `projection`'s output, reading `block`'s input (or the output itself
        when None), with its parameters on `like`'s device and dtype: a float parameter of the
        layer, never a packed 4-bit weight."""
        width = _out_features(projection)
        adapter = Adapter(
            width, self.bottleneck_size or width // self.reduction_factor, non_linearity=self.non_linearity,
            dropout=self.dropout, scaling=self.scaling if block is not None else 1.0, init=self.init,
            reads_block_input=block is not None, device=like.device, dtype=like.dtype,
        )
        projection.add_module("adapter", adapter)
        projection.register_forward_hook(adapter.add_to_output)
        if block is not None:
            block.register_forward_pre_hook(adapter.capture_block_input)

    def _placements(self, sites: LayerSites) -> list[tuple[nn.Module, nn.Module | None]]:
        """(projection the adapter adds to, block whose input it reads or None for the projection's output)."""
        if self.variant == "parallel":
            return [(sites.ffn_output, sites.ffn_input)]
        serial = [sites.attention_output, sites.ffn_output] if self.variant == "houlsby" else [sites.ffn_output]
        return [(projection, None) for projection in serial]

    def _chosen_layers(self, anatomy: Anatomy) -> list[int]:
        if self.layers is None:
            return list(range(anatomy.num_layers))
        missing = [i for i in self.layers if i >= anatomy.num_layers]
        if missing:
            last = anatomy.num_layers - 1
            raise PeftkitError(f"adapter layers {missing} do not exist: the model has layers 0-{last}")
        return self.layers


def find_sites(model: nn.Module, layer: nn.Module) -> LayerSites:
    """The first row of `SITE_PATHS` whose three paths all exist in `layer`."""
    for paths in SITE_PATHS:
        modules = [_find(layer, path) for path in paths]
        if all(m is not None for m in modules):
            return LayerSites(*modules)
    looked_for = "; ".join(", ".join(paths) for paths in SITE_PATHS)
    raise PeftkitError(
        f"adapter cannot place adapters in {type(model).__name__} (layer {type(layer).__name__}): "
        f"looked for (attention output, feed-forward output, feed-forward block) paths {looked_for}"
    )


def _find(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, where an integer (negative too) indexes a ModuleList; None if absent."""
    for part in path.split("."):
        if isinstance(module, nn.ModuleList) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(module) <= index < len(module):
                return None
            module = module[index]
        else:
            module = module._modules.get(part)
            if module is None:
                return None
    return module


def _out_features(projection: nn.Module) -> int:
    """Output width without reading the weight (a 4-bit weight is packed): Linear or GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return projection.nf if isinstance(projection, Conv1D) else projection.out_features
