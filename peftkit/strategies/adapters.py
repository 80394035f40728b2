"""Bottleneck adapters, built in because neither PEFT nor AdapterHub offers them on
transformers 5. Each variant reproduces its published design (as AdapterHub's `adapters`
library implements it, whose configs are the usual reference):

- houlsby (Houlsby et al. 2019; `DoubleSeqBnConfig`): after both sub-layers of every layer.
  The adapter reads the sub-layer's output h after its dropout and adds to it, before the
  layer's residual and LayerNorm: out = LN(x + h + A(h)).
- pfeiffer (Pfeiffer et al. 2021, AdapterFusion; `SeqBnConfig`): after the feed-forward
  sub-layer only, reading the output after its residual and LayerNorm, y = LN(x + h); the
  same LayerNorm is applied again after the adapter's residual: out = LN(x + h + A(y)).
  Pre-LN models (Llama, GPT-2, T5) have no norm there: out = x + h + A(x + h).
- parallel (He et al. 2022, "Towards a Unified View"; `ParBnConfig`): beside the
  feed-forward sub-layer, reading its input x (the residual stream it adds to):
  out = LN(x + h + A(x)), or x + h + A(x) in pre-LN models.

A(v) = dropout(scaling * up(act(down(v)))), for every variant. Defaults per variant are the
published ones (`VARIANT_DEFAULTS`); each can be overridden.

The adapter module itself (`peftkit.strategies.bottleneck`, imported when a model is adapted,
so the option schema loads without torch). One mechanism for every variant and architecture:
the adapters become child modules of their
layer (every layer of the stack; an encoder-decoder's encoder and decoder layers alike)
(`adapter_attention`, `adapter_ffn`, so `state_dict`, `.to()` and saving see them) and
forward hooks on the sub-layer's existing modules add them: on the module whose output is h
(the dropout after the output projection; Llama's down/o projections, which have none), a
pre-hook captures x where the sub-layer reads it, and pfeiffer's hook on a post-LN model sits
on the LayerNorm. The base model's own parameters are never renamed or replaced, so a 4-bit
(bitsandbytes) base works unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from peftkit.anatomy import Anatomy, encoder_decoder_stacks, inspect_model, is_under
from peftkit.errors import PeftkitError
from peftkit.strategies.base import Strategy, TaskView, register
from peftkit.strategies.freezing import parse_layer_ranges

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftkit.strategies.bottleneck import Adapter

# Relative paths inside one layer, per architecture family: (module whose output is the
# attention sub-layer's h, module whose output is the feed-forward sub-layer's h, module whose
# input is the residual stream x the feed-forward sub-layer adds to, the LayerNorm applied to
# x + h or "" in pre-LN models). A negative index counts from the end of a ModuleList: T5's
# feed-forward is the last sub-layer (index 1 in the encoder, 2 in the decoder).
SITE_PATHS: tuple[tuple[str, str, str, str], ...] = (
    ("attention.output.dropout", "output.dropout", "intermediate", "output.LayerNorm"),  # BERT, RoBERTa, DeBERTa
    ("attention.out_lin", "ffn.dropout", "ffn", "output_layer_norm"),  # DistilBERT (no dropout after out_lin)
    ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm", ""),  # Llama, Mistral, Qwen
    ("attn.resid_dropout", "mlp.dropout", "ln_2", ""),  # GPT-2
    ("layer.0.dropout", "layer.-1.dropout", "layer.-1.layer_norm", ""),  # T5
)


# The published settings (AdapterHub's DoubleSeqBnConfig, SeqBnConfig, ParBnConfig).
VARIANT_DEFAULTS: dict[str, dict[str, object]] = {
    "houlsby": {"reduction_factor": 16, "non_linearity": "silu", "scaling": 1.0, "init": "houlsby"},
    "pfeiffer": {"reduction_factor": 16, "non_linearity": "relu", "scaling": 1.0, "init": "bert"},
    "parallel": {"reduction_factor": 2, "non_linearity": "relu", "scaling": 4.0, "init": "zero-up"},
}


@dataclasses.dataclass(frozen=True)
class LayerSites:
    """The modules of one layer that adapters hook onto (see SITE_PATHS)."""

    attention_output: nn.Module
    ffn_output: nn.Module
    ffn_stream_reader: nn.Module
    ffn_norm: nn.Module | None


@register("adapter")
@dataclasses.dataclass
class BottleneckAdapter(Strategy):
    """Small bottleneck modules inserted into every chosen layer; the base is frozen, the
    adapters and what the task trains beside (a new head) train. bottleneck =
    `bottleneck_size`, else hidden // `reduction_factor`; unset options take the variant's
    published defaults (VARIANT_DEFAULTS)."""

    trains = "bottleneck adapters + new head"
    default_lr = 1e-3
    saves = "trained-tensors"
    variant: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    reduction_factor: int | None = None
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] | None = None
    dropout: float = 0.0
    scaling: float | None = None
    layers: str | list[int] | None = None
    init: Literal["zero-up", "bert", "houlsby"] | None = None

    def __post_init__(self) -> None:
        for option, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, option) is None:
                setattr(self, option, value)
        if self.reduction_factor < 1 or (self.bottleneck_size is not None and self.bottleneck_size < 1):
            raise PeftkitError("adapter needs reduction_factor >= 1 and bottleneck_size >= 1 (or unset)")
        if not 0 <= self.dropout < 1:
            raise PeftkitError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.layers is not None:
            self.layers = parse_layer_ranges(self.layers)

    def apply(self, model: nn.Module, task: TaskView) -> nn.Module:
        """Freeze everything but what the task trains beside (a new head), then add adapters to
        the chosen layers (in place)."""
        anatomy, beside = inspect_model(model), task.trained_beside(model)
        for name, param in model.named_parameters():
            param.requires_grad_(is_under(name, beside))
        width = model.config.get_text_config().hidden_size
        layers = [stack[i] for stack in adapted_stacks(model, anatomy) for i in self._chosen_layers(len(stack))]
        for layer in layers:
            sites = find_sites(model, layer)
            like = next(p for p in layer.parameters() if p.is_floating_point())  # never a packed 4-bit weight
            if self.variant == "houlsby":
                adapter = self._attach(layer, "adapter_attention", width, like, "output")
                sites.attention_output.register_forward_hook(adapter.add_to_output)
            self._attach_ffn(layer, sites, width, like)
        return model

    def _attach_ffn(self, layer: nn.Module, sites: LayerSites, width: int, like: torch.Tensor) -> None:
        if self.variant == "houlsby":
            adapter = self._attach(layer, "adapter_ffn", width, like, "output")
            sites.ffn_output.register_forward_hook(adapter.add_to_output)
        elif self.variant == "pfeiffer" and sites.ffn_norm is not None:
            adapter = self._attach(layer, "adapter_ffn", width, like, "output")
            sites.ffn_norm.register_forward_pre_hook(adapter.capture)
            sites.ffn_norm.register_forward_hook(adapter.renormalize)
        else:
            adapter = self._attach(layer, "adapter_ffn", width, like, "sum" if self.variant == "pfeiffer" else "stream")
            sites.ffn_stream_reader.register_forward_pre_hook(adapter.capture)
            sites.ffn_output.register_forward_hook(adapter.add_to_output)

    def _attach(self, layer: nn.Module, name: str, width: int, like: torch.Tensor,
                reads: Literal["output", "stream", "sum"]) -> Adapter:
        from peftkit.strategies.bottleneck import Adapter

        adapter = Adapter(width, self.bottleneck_size or width // self.reduction_factor,
                          non_linearity=self.non_linearity, dropout=self.dropout, scaling=self.scaling,
                          init=self.init, reads=reads, device=like.device, dtype=like.dtype)
        layer.add_module(name, adapter)
        return adapter

    def _chosen_layers(self, count: int) -> list[int]:
        if self.layers is None:
            return list(range(count))
        missing = [i for i in self.layers if i >= count]
        if missing:
            raise PeftkitError(f"adapter layers {missing} do not exist: the model has layers 0-{count - 1}")
        return self.layers


def adapted_stacks(model: nn.Module, anatomy: Anatomy) -> list[nn.ModuleList]:
    """The layer stacks that get adapters: an encoder-decoder's two (encoder and decoder, as
    AdapterHub places them; the decoder's cross-attention gets none, its default), else the one."""
    if getattr(model.config, "is_encoder_decoder", False):
        return [model.get_submodule(stack.prefix) for stack in encoder_decoder_stacks(model)]
    return [model.get_submodule(anatomy.layers_prefix)]


def find_sites(model: nn.Module, layer: nn.Module) -> LayerSites:
    """The first row of `SITE_PATHS` whose paths all exist in `layer`."""
    for paths in SITE_PATHS:
        modules = [_find(layer, path) for path in paths[:3]]
        norm = _find(layer, paths[3]) if paths[3] else None
        if all(m is not None for m in modules) and (norm is not None or not paths[3]):
            return LayerSites(*modules, ffn_norm=norm)
    looked_for = "; ".join(", ".join(p for p in paths if p) for paths in SITE_PATHS)
    raise PeftkitError(
        f"adapter cannot place adapters in {type(model).__name__} (layer {type(layer).__name__}): "
        f"looked for (attention output, feed-forward output, feed-forward input[, its LayerNorm]) paths {looked_for}"
    )


def _find(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, where an integer (negative too) indexes a ModuleList; None if absent."""
    from torch import nn

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
