"""The load guard: a task model loads every base weight from its checkpoint, or refuses in one line.

Tiny random checkpoints check the guard's rules (a renamed base refused, a base under another
prefix mapped, a new head quiet); the real models fill the architecture matrix that
`python tests/test_load_guard.py` prints as the README's Markdown table.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftkit.errors import PeftkitError
from peftkit.models import (TINY, ModelSource, four_bit_config, load_causal_lm, load_for_classification,
                            load_tokenizer, random_checkpoint, resolve_model)
from peftkit.tasks import TASKS

LABELS = ["O", "B-X", "I-X"]
MODELS = ("minilm", "smollm2-135m")
# what each real (model, task) does; seq2seq has no class for either architecture
EXPECTED = {
    ("minilm", "classification"): "loads", ("minilm", "token-classification"): "loads", ("minilm", "qa"): "loads",
    ("minilm", "sft"): "refuses", ("minilm", "seq2seq"): "refuses",
    ("smollm2-135m", "classification"): "loads", ("smollm2-135m", "token-classification"): "loads",
    ("smollm2-135m", "qa"): "loads", ("smollm2-135m", "sft"): "loads", ("smollm2-135m", "seq2seq"): "refuses",
    ("minilm", "reward"): "loads", ("smollm2-135m", "reward"): "loads",
    **{(model, kind): "refuses" if model == "minilm" else "loads" for model in ("minilm", "smollm2-135m")
       for kind in ("dpo", "kto", "orpo", "simpo", "grpo")},  # causal-LM kinds: an encoder has no LM head
}


def checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file safetensors checkpoint, read with safetensors itself."""
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's base (the module at `base_model_prefix`), named as in the model."""
    prefix = model.base_model_prefix
    return {f"{prefix}.{name}": tensor for name, tensor in getattr(model, prefix).state_dict().items()}


def checkpoint_name(key: str, prefix: str, checkpoint: dict[str, torch.Tensor]) -> str:
    """The one checkpoint tensor a base weight must equal: under the class's prefix, bare (a
    base model saved as itself) or under the checkpoint's own single prefix (`model.`)."""
    rest = key[len(prefix) + 1:]
    own = {k.split(".", 1)[0] for k in checkpoint if "." in k and k.split(".", 1)[1] == rest}
    candidates = [c for c in (key, rest, *(f"{p}.{rest}" for p in sorted(own))) if c in checkpoint]
    assert len(set(candidates)) == 1, f"{key}: checkpoint names {candidates}"
    return candidates[0]


def assert_base_is_the_checkpoint(model: torch.nn.Module, path: str | Path) -> int:
    """Every base tensor equals its checkpoint tensor exactly; returns how many there are."""
    checkpoint = checkpoint_tensors(path)
    weights = base_weights(model)
    for key, tensor in weights.items():
        expected = checkpoint[checkpoint_name(key, model.base_model_prefix, checkpoint)]
        assert torch.equal(tensor.float(), expected.float()), f"{key} differs from the checkpoint"
    return len(weights)


def load_task_model(model: str, task: str, **weights) -> torch.nn.Module:
    """The task's model of a source, as a run loads it (`Task.load_model`)."""
    source = resolve_model(model)
    return TASKS[task].load_model(source, {"label_names": LABELS}, load_tokenizer(source), **weights)


def copied_checkpoint(source: str, target: Path, rename=lambda key: key) -> Path:
    """A copy of a cached checkpoint directory with its tensor names passed through `rename`."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, target / "model.safetensors",
              metadata={"format": "pt"})
    return target


def test_a_renamed_base_is_refused_in_one_line(tmp_path):
    """Layer weights named `encoder.layers.N` (another naming than BERT's `encoder.layer.N`)
    would load nothing of the stack: refused, with the count and the first names."""
    original = resolve_model("tiny-bert").path
    path = copied_checkpoint(original, tmp_path / "renamed", lambda k: k.replace("encoder.layer.", "encoder.layers."))
    renamed = [k for k in checkpoint_tensors(original) if k.startswith("encoder.layer.")]
    source = ModelSource("renamed-bert", str(path), "local")
    with pytest.raises(PeftkitError) as refused:
        load_for_classification(source, ["a", "b"], load_tokenizer(source))
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("cannot load renamed-bert as BertForSequenceClassification: "
                           f"{len(renamed)} of its ")
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in line and "likely cause: " in line


def test_a_base_with_other_sizes_is_refused(tmp_path):
    """A config whose sizes the checkpoint does not have (a narrower feed-forward) would reinit
    those weights at the config's shape: refused, naming a shape on each side."""
    path = copied_checkpoint(resolve_model("tiny-bert").path, tmp_path / "narrow")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    source = ModelSource("narrow-bert", str(path), "local")
    with pytest.raises(PeftkitError, match=r"6 of its weights have another shape in the checkpoint \(bert\.encoder\."
                                           r"layer\.0\.intermediate\.dense\.bias: \[128\] there, \[96\] here, \.\.\.\); "
                                           r"likely cause: the checkpoint's sizes differ from its config's"):
        load_for_classification(source, ["a", "b"], load_tokenizer(source))


def test_qa_reads_a_causal_lm_base_under_its_own_name():
    """LlamaForQuestionAnswering keeps its base at `transformer`, LlamaForCausalLM saved it
    as `model`: mapped on the way in, so every base tensor is the checkpoint's."""
    model = load_task_model("tiny-llama", "qa")
    assert model.base_model_prefix == "transformer"
    assert assert_base_is_the_checkpoint(model, resolve_model("tiny-llama").path) == len(
        [k for k in checkpoint_tensors(resolve_model("tiny-llama").path) if k.startswith("model.")])


def test_qa_mapping_holds_for_a_4bit_base():
    """QLoRA's load: the same mapping under bitsandbytes 4-bit. Unquantized tensors (embeddings,
    norms) equal the checkpoint's; a quantized one dequantizes close to its checkpoint tensor."""
    import bitsandbytes.functional as bnbf

    path = resolve_model("tiny-llama").path
    model = load_task_model("tiny-llama", "qa", quantization=four_bit_config("nf4", True, torch.float32))
    checkpoint = checkpoint_tensors(path)
    assert torch.equal(model.transformer.embed_tokens.weight, checkpoint["model.embed_tokens.weight"])
    assert torch.equal(model.transformer.norm.weight, checkpoint["model.norm.weight"])
    quantized = model.transformer.layers[0].self_attn.q_proj.weight
    assert type(quantized).__name__ == "Params4bit"
    restored = bnbf.dequantize_4bit(quantized.data, quantized.quant_state).float()
    original = checkpoint["model.layers.0.self_attn.q_proj.weight"]
    assert torch.nn.functional.cosine_similarity(restored.flatten(), original.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("task", ["classification", "token-classification"])
def test_a_new_head_alone_loads_quietly(model, task):
    """Only the new head is missing (and for tiny-llama the checkpoint's own `lm_head` goes
    unused): it loads, every base tensor is the checkpoint's, and transformers' load report,
    which lists those keys, is not shown."""
    import transformers

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    transformers.logging.set_verbosity_warning()
    try:
        loaded = load_task_model(model, task)
    finally:
        transformers.logging.set_verbosity_error()
        logger.removeHandler(handler)
    assert_base_is_the_checkpoint(loaded, resolve_model(model).path)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]


def test_a_reshaped_head_is_a_new_head(tmp_path):
    """A checkpoint saved with a 3-label classifier, loaded for 2 labels: the head starts anew
    (it is the task's), the base loads whole."""
    from transformers import AutoModelForSequenceClassification

    tiny = resolve_model("tiny-bert")
    AutoModelForSequenceClassification.from_pretrained(tiny.path, num_labels=3).save_pretrained(tmp_path / "three")
    shutil.copy(Path(tiny.path) / "tokenizer.json", tmp_path / "three")
    shutil.copy(Path(tiny.path) / "tokenizer_config.json", tmp_path / "three")
    source = ModelSource("three-labels", str(tmp_path / "three"), "local")
    model = load_for_classification(source, ["a", "b"], load_tokenizer(source))
    assert model.classifier.out_features == 2
    assert_base_is_the_checkpoint(model, tmp_path / "three")


def test_a_tied_output_layer_is_not_missing():
    """A decoder saved with its output layer tied to the embeddings has no `lm_head` in its
    file; transformers ties it after loading, so the guard lets it through."""
    path = random_checkpoint("tiny-llama-tied", {**TINY["tiny-llama"], "tie_word_embeddings": True})
    assert "lm_head.weight" not in checkpoint_tensors(path)
    source = ModelSource("tied-llama", str(path), "local")
    model = load_causal_lm(source, load_tokenizer(source))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_base_is_the_checkpoint(model, path)


def test_an_encoder_without_lm_head_is_refused_for_sft():
    with pytest.raises(PeftkitError, match=r"^cannot load tiny-bert as BertLMHeadModel: 6 of its 44 weights .*"
                                           r"likely cause: the checkpoint \(saved by BertModel\) has no "
                                           r"language-model head \('cls'\)"):
        load_task_model("tiny-bert", "sft")


def test_an_architecture_without_the_task_class_is_refused():
    with pytest.raises(PeftkitError, match="'bert' model and transformers has no AutoModelForSeq2SeqLM"):
        load_task_model("tiny-bert", "seq2seq")


def matrix_result(model: str, task: str) -> str:
    """One cell of the real-weights matrix: how many base weights load (each checked equal to
    the checkpoint's), or the refusal's line."""
    try:
        loaded = load_task_model(model, task)
    except PeftkitError as refused:
        assert "\n" not in str(refused)
        return f"refused: {refused}"
    path = resolve_model(model).path
    count = assert_base_is_the_checkpoint(loaded, path)
    checkpoint, prefix = checkpoint_tensors(path), loaded.base_model_prefix
    saved_under = {checkpoint_name(key, prefix, checkpoint).split(".", 1)[0] for key in base_weights(loaded)}
    renamed = saved_under != {prefix} and len(saved_under) == 1 and not hasattr(getattr(loaded, prefix), *saved_under)
    return f"all {count} base weights" + (f" (the checkpoint's `{saved_under.pop()}.*` read as `{prefix}.*`)"
                                          if renamed else "")


@pytest.mark.real
@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("model", MODELS)
def test_real_weights_matrix(model, task):
    """Every task kind with each packaged model: every base weight loads, or one line refuses."""
    result = matrix_result(model, task)
    assert result.startswith("all " if EXPECTED[model, task] == "loads" else "refused: "), result


@pytest.mark.real
def test_smollm2_squad_lora_trains_from_the_pretrained_weights(tmp_path, data_dir, monkeypatch):
    """The issue's run (SmolLM2, SQuAD, LoRA): it used to train LlamaForQuestionAnswering from a
    random base. Now the base it trains is the checkpoint's: LoRA leaves the embeddings (and
    every frozen base weight) as loaded, so after training they still equal the file's."""
    import peftkit
    from peftkit import run

    loaded = []
    real_load_base = run.load_base

    def keep(*args, **kwargs):
        loaded.append(real_load_base(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(run, "load_base", keep)
    result = peftkit.train({"model": "smollm2-135m", "task": "squad", "strategy": "lora", "data_dir": str(data_dir),
                            "output_dir": str(tmp_path / "run"), "max_train_samples": 2, "max_eval_samples": 2,
                            "epochs": 1, "select": "last", "max_length": 64})  # the 32/16/384: 2.5 min
    assert "f1" in result.metrics
    checkpoint = checkpoint_tensors(resolve_model("smollm2-135m").path)
    trained = {name.replace(".base_layer", ""): tensor for name, tensor in loaded[0].state_dict().items()
               if name.startswith("transformer.") and "lora_" not in name}
    assert sorted(trained) == sorted("transformer." + k.removeprefix("model.") for k in checkpoint)
    assert torch.equal(trained["transformer.embed_tokens.weight"], checkpoint["model.embed_tokens.weight"])
    assert all(torch.equal(trained["transformer." + k.removeprefix("model.")], v) for k, v in checkpoint.items())


def markdown_table() -> str:
    """The README's table: model | task | result, for every packaged model and task kind."""
    names = {"minilm": "minilm (all-MiniLM-L6-v2)", "smollm2-135m": "smollm2-135m (SmolLM2-135M-Instruct)"}
    rows = ["| model | task | result |", "|---|---|---|"]
    for model in MODELS:
        for task in sorted(TASKS):
            rows.append(f"| {names[model]} | {task} | {matrix_result(model, task).replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()
    sys.exit(print(markdown_table()))
