"""pooling: one reading of the model, a run setting every strategy honours."""

from __future__ import annotations

import pytest
import torch

from peftkit.anatomy import unwrap_peft
from peftkit.record import current_config
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.models import declared_pooling, load_for_classification, load_tokenizer, resolve_model
from peftkit.pooling import read_with
from peftkit.strategies import build_strategy
from peftkit.tasks import TASKS


@pytest.mark.parametrize("strategy", ["full", "linear-probe", "lora", "dora", "ia3", "adapter", "prompt-tuning",
                                      "prefix-tuning", "peft:loha"])
def test_the_head_reads_the_masked_mean_of_the_last_hidden_states_under_every_strategy(strategy):
    """Computed by hand from the base model's own output: padding excluded, prompt tuning's
    virtual tokens (prepended, attended to) included, prefix tuning's (keys and values only) not."""
    source = resolve_model("tiny-bert")
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    plain = load_for_classification(source, ["neg", "pos"], tokenizer)
    model = read_with("mean", plain, lambda m: build_strategy(strategy).apply(m, TASKS["classification"])).eval()
    inner, seen = unwrap_peft(model), {}
    inner.bert.register_forward_hook(lambda module, args, out: seen.update(hidden=out[0]))
    inner.get_submodule("classifier").register_forward_pre_hook(lambda module, args: seen.update(head_input=args[0]))
    batch = tokenizer(["a gripping , funny film about nothing", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    hidden, mask = seen["hidden"], batch["attention_mask"].float()
    virtual = hidden.shape[1] - mask.shape[1]
    mask = torch.cat([torch.ones(2, virtual), mask], dim=1)
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(seen["head_input"], expected)
    assert mask[1].sum() < mask.shape[1]  # the short sentence was padded: the mask mattered


def test_auto_is_what_the_checkpoint_declares():
    """MiniLM's sentence-transformers pooling module averages the token states; tiny models and
    per-token tasks read the model their own way; SmolLM2 (no such module) reads its last token."""
    assert declared_pooling("minilm") == "mean" and declared_pooling("tiny-bert") == "model"
    assert make_config({"model": "minilm", "task": "sst2"}).pooling == "mean"
    assert make_config({"model": "minilm", "task": "rte", "strategy": "lora"}).pooling == "mean"
    assert make_config({"model": "minilm", "task": "squad"}).pooling == "model"
    assert make_config({"model": "smollm2-135m", "task": "sst2"}).pooling == "model"
    assert make_config({"model": "minilm", "task": "sst2", "pooling": "model"}).pooling == "model"


def test_declared_pooling_reads_a_local_sentence_transformers_checkpoint(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text('[{"path": "", "type": "sentence_transformers.models.Transformer"},'
                                           ' {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    assert declared_pooling(str(tmp_path)) == "model"  # a [CLS] model
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}')
    assert declared_pooling(str(tmp_path)) == "mean"
    (tmp_path / "modules.json").write_text("not json")
    assert declared_pooling(str(tmp_path)) == "model"


def test_pooling_is_a_run_setting_not_a_strategy_option():
    with pytest.raises(PeftkitError, match="pooling is a run setting, not an option of strategy 'full'"):
        make_config({"model": "tiny-bert", "strategy": {"name": "full", "pooling": "mean"}})
    with pytest.raises(PeftkitError, match="pooling=mean makes one vector per example"):
        make_config({"model": "tiny-bert", "task": "sst2-chat", "pooling": "mean"})


def test_older_records_keep_the_reading_they_trained_with():
    """A record from before pooling was a run setting: its strategy's option moves up, and a
    strategy without one read the model its own way (not what auto now picks for MiniLM)."""
    old_full = {"model": "minilm", "task": "sst2", "strategy": {"name": "full", "pooling": "mean", "head_lr": None}}
    assert current_config(old_full)["pooling"] == "mean" and "pooling" not in current_config(old_full)["strategy"]
    old_lora = {"model": "minilm", "task": "sst2", "strategy": {"name": "lora", "r": 8}}
    assert make_config(current_config(old_lora)).pooling == "model"
    new = {"model": "minilm", "task": "sst2", "strategy": {"name": "lora"}, "pooling": "mean"}
    assert current_config(new) == new
