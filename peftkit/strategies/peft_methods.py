"""PEFT methods with a strategy of their own besides the LoRA family: ia3, prompt-tuning,
prefix-tuning, p-tuning (`peft:<method>` for every other one: peftkit.strategies.peft_registry).

All are `PeftStrategy`s (one save/load/merge path). Prompt learning adds trained virtual
tokens in front of the input instead of changing weights, so it cannot be merged, and it
rejects architectures that cannot take it (see `PromptLearning.check`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from peftkit.anatomy import inspect_model
from peftkit.errors import PeftkitError
from peftkit.strategies.base import TaskView, register
from peftkit.strategies.peft_base import PeftStrategy

if TYPE_CHECKING:
    from torch import nn


# Leaf names of the key and value projections (separate, or fused with the query) across families.
KEY_VALUE_LEAVES = {"k", "v", "key", "value", "k_proj", "v_proj", "key_proj", "value_proj", "k_lin", "v_lin"}
FUSED_QKV_LEAVES = {"c_attn", "qkv", "qkv_proj", "Wqkv", "query_key_value"}


@register("ia3")
@dataclasses.dataclass
class IA3(PeftStrategy):
    """Learned vectors that rescale the keys, the values and the feed-forward activations
    (Liu et al. 2022). "auto" finds the key/value projections by name and takes the layer's
    last projection as the feed-forward output, whose input the vector rescales."""

    trains = "scaling vectors on keys, values, FFN + new head"
    default_lr = 3e-3  # the IA3 paper's rate: a few thousand scalars need big steps, still < prompt tuning
    target_modules: str | list[str] = "auto"
    feedforward_modules: str | list[str] = "auto"

    config_name = "IA3Config"

    def config_options(self, model: nn.Module) -> dict[str, Any]:
        keys_values, ffn_output = _ia3_sites(inspect_model(model).layer_linear_suffixes, type(model).__name__)
        targets, feedforward = self.target_modules, self.feedforward_modules
        return dict(
            target_modules=_in_any_layer([*keys_values, ffn_output]) if targets == "auto" else targets,
            feedforward_modules=_in_any_layer([ffn_output]) if feedforward == "auto" else feedforward,
        )


def _ia3_sites(suffixes: tuple[str, ...], model_name: str) -> tuple[list[str], str]:
    """(key and value projections, feed-forward output projection) among a layer's linears."""
    leaf = {s: s.rsplit(".", 1)[-1] for s in suffixes}
    keys_values = [s for s in suffixes if leaf[s] in KEY_VALUE_LEAVES]
    keys_values = keys_values or [s for s in suffixes if leaf[s] in FUSED_QKV_LEAVES]
    if not keys_values or suffixes[-1] in keys_values:
        raise PeftkitError(
            f"ia3 cannot find the key/value projections of {model_name} among its layer projections "
            f"{list(suffixes)}: pass target_modules and feedforward_modules"
        )
    return keys_values, suffixes[-1]


def _in_any_layer(suffixes: list[str]) -> str:
    """A regex (PEFT full-matches a string target) for these paths directly under a layer
    index: "output.dense" then matches BERT's FFN output, not "attention.output.dense"."""
    return r".*\.\d+\.(" + "|".join(re.escape(s) for s in suffixes) + ")"


@dataclasses.dataclass
class PromptLearning(PeftStrategy):
    """Trained virtual tokens in front of the input; the model is frozen, the head trains."""

    merge_refusal = "prompt learning prepends trained virtual tokens to the input; there are no weights to fold them into"
    virtual_tokens_enter: ClassVar[str] = "input"  # or "keys": prefixes lengthen only the keys and values
    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise PeftkitError(f"{self.name} needs num_virtual_tokens >= 1, got {self.num_virtual_tokens}")

    def check(self, model_config: Any, task: TaskView | None = None) -> None:
        if getattr(model_config, "is_encoder_decoder", False) and not (task and task.generates_text):
            raise PeftkitError(
                f"{self.name} cannot train a {model_config.model_type} classifier: encoder-decoder classifiers find "
                "their end-of-sequence token in input_ids, which prompt learning replaces with embeddings; use lora or ia3"
            )

    def prepare_tokenizer(self, tokenizer: Any, model_config: Any) -> None:
        """Decoder-only classifiers read the last non-padding token, found from input_ids;
        given embeddings they read the last position, so the padding must go on the left."""
        if _is_decoder_only(model_config):
            tokenizer.padding_side = "left"

    def config_options(self, model: nn.Module) -> dict[str, Any]:
        # sizes PEFT cannot read from every config (DistilBERT's `dim`, `n_heads`, `n_layers`)
        sizes = {"token_dim": _width(model), "num_layers": inspect_model(model).num_layers}
        heads = getattr(model.config, "num_attention_heads", None)
        return {"num_virtual_tokens": self.num_virtual_tokens, **sizes, **({"num_attention_heads": heads} if heads else {}),
                **self.prompt_options(model)}

    def wrapped(self, model: nn.Module) -> nn.Module:
        """PEFT 0.21's token classifier and extractive QA model put the virtual tokens in front
        of the input and return logits for them too, while labels and answer positions count
        the real tokens only: the token classifier's loss fails on the length, and the QA loss
        silently reads every answer `num_virtual_tokens` too early. Aligned here: labels get
        -100 at the virtual positions, answer positions move past them, and the logits
        returned are the real tokens' only."""
        if self.virtual_tokens_enter == "input" and type(model).__name__ in (
                "PeftModelForTokenClassification", "PeftModelForQuestionAnswering"):
            _skip_virtual_positions(model, self.num_virtual_tokens)
        return model

    def prompt_options(self, model: nn.Module) -> dict[str, Any]:
        """The prompt-learning method's own options for this model."""
        raise NotImplementedError


def _skip_virtual_positions(model: nn.Module, count: int) -> None:
    """Hooks that make a prompt-learned token classifier take and return the real tokens only."""
    import torch

    def shift_targets(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if kwargs.get("labels") is not None:
            kwargs["labels"] = torch.nn.functional.pad(kwargs["labels"], (count, 0), value=-100)
        for name in ("start_positions", "end_positions"):
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name] + count
        return args, kwargs

    def drop_virtual_logits(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        for name in ("logits", "start_logits", "end_logits"):
            if output.get(name) is not None:
                output[name] = output[name][:, count:]
        return output

    model.register_forward_pre_hook(shift_targets, with_kwargs=True)
    model.register_forward_hook(drop_virtual_logits, with_kwargs=True)


@register("prompt-tuning")
@dataclasses.dataclass
class PromptTuning(PromptLearning):
    """Soft prompt: trained input embeddings of `num_virtual_tokens` virtual tokens (Lester
    et al. 2021), initialised at random, from `init_text`'s tokens, or from sampled vocabulary."""

    trains = "virtual token embeddings + new head"
    config_name = "PromptTuningConfig"
    default_lr = 3e-2  # Lester et al. / PEFT's examples: a soft prompt needs ~30x LoRA's rate
    init: Literal["random", "text", "sample-vocab"] = "random"
    init_text: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.init == "text") != (self.init_text is not None):
            raise PeftkitError(
                "prompt-tuning takes init_text together with init=text "
                "(e.g. --set init=text --set init_text='Is this review positive?')"
            )

    def prompt_options(self, model: nn.Module) -> dict[str, Any]:
        from peft import PromptTuningInit

        if self.init != "text":
            init = PromptTuningInit.RANDOM if self.init == "random" else PromptTuningInit.SAMPLE_VOCAB
            return {"prompt_tuning_init": init}
        # PEFT tokenizes init_text with the tokenizer saved beside the base model's weights
        return {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": self.init_text,
                "tokenizer_name_or_path": model.config._name_or_path}


@register("prefix-tuning")
@dataclasses.dataclass
class PrefixTuning(PromptLearning):
    """Trained key/value prefixes for every attention layer (Li & Liang 2021), optionally
    produced by a two-layer MLP (`projection`) of width `encoder_hidden_size` (default: the model's)."""

    trains = "per-layer key/value prefixes + new head"
    virtual_tokens_enter = "keys"
    config_name = "PrefixTuningConfig"
    default_lr = 1e-2  # PEFT's prefix-tuning examples; between p-tuning and prompt tuning
    projection: bool = False
    encoder_hidden_size: int | None = None

    def check(self, model_config: Any, task: TaskView | None = None) -> None:
        super().check(model_config, task)
        _check_takes_key_value_cache(self.name, model_config, ("cache", "past_key_values"))

    def prepare_tokenizer(self, tokenizer: Any, model_config: Any) -> None:
        """Prefixes enter through the cache and the model still gets input_ids, so a decoder
        classifier finds the last real token itself: the tokenizer keeps its own padding side
        (right padding leaves the real tokens' positions alone)."""

    def prompt_options(self, model: nn.Module) -> dict[str, Any]:
        return {"prefix_projection": self.projection, "encoder_hidden_size": self.encoder_hidden_size or _width(model)}

    def wrapped(self, model: nn.Module) -> nn.Module:
        """PEFT 0.21 hands a sequence classifier its prefixes as `past_key_values`, and
        refuses a model whose forward has no argument of that name; transformers 5 models take
        the same pre-filled cache as `cache`. The classifier's forward passes it under that name."""
        import types

        model._prefix_tuning_forward = types.MethodType(_prefix_forward_with_cache, model)
        return model


def _prefix_forward_with_cache(self: Any, input_ids: Any = None, attention_mask: Any = None, inputs_embeds: Any = None,
                               labels: Any = None, output_attentions: Any = None, output_hidden_states: Any = None,
                               return_dict: Any = None, **kwargs: Any) -> Any:
    """PeftModelForSequenceClassification's prefix-tuning forward (its caller has already
    lengthened the attention mask by the virtual tokens), with the prefix cache as `cache`."""
    batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           labels=labels, cache=self.get_prompt(batch_size), use_cache=True, **kwargs)


@register("p-tuning")
@dataclasses.dataclass
class PTuning(PromptLearning):
    """Virtual token embeddings produced by a small trained encoder, an MLP or an LSTM
    (Liu et al. 2021), of width `encoder_hidden_size` (default: the model's)."""

    trains = "prompt encoder + new head"
    config_name = "PromptEncoderConfig"
    default_lr = 1e-3  # PEFT's p-tuning sequence-classification guide: the MLP trains like an adapter
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = None

    def prompt_options(self, model: nn.Module) -> dict[str, Any]:
        return {"encoder_reparameterization_type": self.encoder.upper(),
                "encoder_hidden_size": self.encoder_hidden_size or _width(model)}


def _width(model: nn.Module) -> int:
    """The model's embedding width: the prompt encoders' default hidden size."""
    return model.get_input_embeddings().embedding_dim


def _is_decoder_only(model_config: Any) -> bool:
    """A causal LM architecture with no masked-LM form (GPT-2, Llama; not BERT, not T5)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = model_config.model_type
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _check_takes_key_value_cache(name: str, model_config: Any, arguments: tuple[str, ...] = ("past_key_values",)) -> None:
    """PEFT hands prefixes to the model as a pre-filled key/value cache, and fails (at the
    first forward) on a classifier whose forward, or its backbone's, has no argument for it.
    The same test, on the classes alone, before any weights load."""
    import peft
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING

    try:
        classes = [MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(model_config)], MODEL_MAPPING[type(model_config)]]
    except KeyError:  # an architecture transformers does not register: leave it to PEFT
        return
    if not any(arg in inspect.signature(cls.forward).parameters for cls in classes for arg in arguments):
        raise PeftkitError(
            f"{name} cannot train {classes[0].__name__}: PEFT {peft.__version__} passes the prefix as a key/value cache "
            f"({' or '.join(arguments)}), which this model does not take in transformers {transformers.__version__}; "
            "use prompt-tuning, p-tuning or lora"
        )
