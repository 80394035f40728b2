"""The architecture matrix: tiny random models of the families users bring, times the
strategies, times every task kind the family's classes support. Each cell applies the
strategy, trains two steps, saves, reloads onto a fresh base and must give identical outputs;
or the strategy refuses the pair with one line before any weights load. The README's table
of cells is printed by `python tests/test_architectures.py`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from peftkit.errors import PeftkitError
from peftkit.pooling import read_with
from peftkit.resolve import check_pooling
from peftkit.anatomy import head_is_one_linear
from peftkit.run import check_structure
from peftkit.strategies import build_strategy
from peftkit.tasks import TASKS

pytestmark = pytest.mark.slow  # ~780 cells, about a minute: in CI, not in the fast loop

VOCAB = 128
WIDTH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "max_position_embeddings": 128}
DECODER = {**WIDTH, "num_key_value_heads": 2}
FAMILIES = {
    "bert": WIDTH, "roberta": WIDTH, "electra": {**WIDTH, "embedding_size": 64},
    "deberta-v2": {**WIDTH, "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"]},
    "distilbert": {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "max_position_embeddings": 128},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "llama": DECODER, "qwen2": DECODER, "mistral": DECODER, "phi": DECODER,
    "gemma": {**DECODER, "head_dim": 16},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "decoder_start_token_id": 0},
    "bart": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "max_position_embeddings": 128},
}
STRATEGIES = ["full", "partial", "linear-probe", "bitfit", "lora", "dora", "adapter", "ia3", "prompt-tuning",
              "prefix-tuning", "peft:loha", "mean-pooling"]
KINDS = ["classification", "token-classification", "qa", "sft", "seq2seq"]


def config_of(family: str, kind: str = "classification"):
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                               **FAMILIES[family])
    config.num_labels = 2 if kind == "qa" else 3  # a span head has two outputs (start, end)
    return config


def model_class(family: str, kind: str):
    """The family's class for the task kind, or None where transformers has none."""
    auto = getattr(transformers, TASKS[kind].model_class)
    try:
        return auto._model_mapping[type(config_of(family))]
    except KeyError:
        return None


def batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    ids[0, 11], ids[1, 8] = 2, 2  # each ends with the end-of-sequence token (encoder-decoder classifiers read it)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "classification":
        inputs["labels"] = torch.tensor([0, 2])
    elif kind == "token-classification":
        inputs["labels"] = torch.where(mask.bool(), ids % 3, -100)
    elif kind == "qa":
        inputs |= {"start_positions": torch.tensor([2, 3]), "end_positions": torch.tensor([4, 5])}
    elif kind == "sft":
        inputs["labels"] = torch.where(mask.bool(), ids, -100)
    else:
        inputs["labels"] = torch.randint(3, VOCAB, (2, 5), generator=generator)
    return inputs


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The logits to compare (a seq2seq model needs its targets to build the decoder's inputs)."""
    keep = ("input_ids", "attention_mask", "labels") if kind == "seq2seq" else ("input_ids", "attention_mask")
    out = model(**{k: v for k, v in inputs.items() if k in keep})
    return out.start_logits if kind == "qa" else out.logits


def run_cell(family: str, kind: str, strategy_name: str) -> str:
    """'ok', 'refused: <line>', or 'n/a' (transformers has no class for the pair)."""
    cls = model_class(family, kind)
    if cls is None:
        return "n/a"
    pooling = "mean" if strategy_name == "mean-pooling" else "model"
    name = "full" if strategy_name == "mean-pooling" else strategy_name
    config, task, strategy = config_of(family, kind), TASKS[kind], build_strategy(name)
    try:  # what `peftkit train` checks before any weights load
        check_pooling(pooling, task)
        strategy.check(config, task)
        task.check_strategy(strategy)
        check_structure(config, strategy, task, config.num_labels, pooling)
    except PeftkitError as err:
        assert "\n" not in str(err)
        return f"refused: {err}"

    def base() -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(config)

    inputs = batch(kind)
    model = read_with(pooling, base(), lambda plain: strategy.apply(plain, task))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(**inputs)
        loss = out.loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        before = outputs(model, inputs, kind)
    with tempfile.TemporaryDirectory() as directory:
        strategy.save(model, Path(directory))
        reloaded = read_with(pooling, base(), lambda plain: strategy.load(plain, Path(directory), task)).eval()
        with torch.no_grad():
            after = outputs(reloaded, inputs, kind)
    assert torch.allclose(before, after, atol=1e-5), f"reloaded outputs differ by {(before - after).abs().max():.2e}"
    if strategy_name == "linear-probe" and kind in ("classification", "token-classification") and head_is_one_linear(model):
        check_cached_features(model, inputs, before)  # the head trains on cached features only where they are exact
    return "ok"


def check_cached_features(model: torch.nn.Module, inputs: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
    """Linear probing trains the head on cached features: the head on them must give the model's logits."""
    from datasets import Dataset

    from peftkit.anatomy import inspect_model
    from peftkit.caches.features import FeatureDataset, HeadOnFeatures, head_inputs

    rows = [{"input_ids": ids[mask.bool()].tolist(), "attention_mask": mask[mask.bool()].tolist(), "labels": labels.tolist(),
             "length": int(mask.sum())} for ids, mask, labels in zip(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])]
    if inputs["labels"].dim() == 2:  # per token: the labels of the real tokens
        for row in rows:
            row["labels"] = row["labels"][:row["length"]]
    data = Dataset.from_list(rows)

    def collate(items):
        width = max(len(i["input_ids"]) for i in items)
        pad = lambda v, fill: [list(x) + [fill] * (width - len(x)) for x in v]  # noqa: E731
        out = {"input_ids": torch.tensor(pad([i["input_ids"] for i in items], 0)),
               "attention_mask": torch.tensor(pad([i["attention_mask"] for i in items], 0))}
        labels = [i["labels"] for i in items]
        out["labels"] = torch.tensor(pad(labels, -100) if isinstance(labels[0], list) else labels)
        return out

    features = FeatureDataset(head_inputs(model, data, collate, batch_size=2), data["labels"])
    head = HeadOnFeatures(model.get_submodule(inspect_model(model).head_modules[0]), model.config.num_labels).eval()
    batch = features.collate([features[i] for i in range(len(features))])
    with torch.no_grad():
        from_features = head(batch["features"])["logits"]
    if inputs["labels"].dim() == 2:
        from_features, logits = from_features[batch["labels"] != -100], logits[inputs["labels"] != -100]
    assert torch.allclose(from_features, logits, atol=1e-5), "the head on cached features disagrees with the model"


CELLS = [(f, k, s) for f in FAMILIES for k in KINDS for s in STRATEGIES]


@pytest.mark.parametrize("family,kind,strategy", CELLS, ids=["-".join(c) for c in CELLS])
def test_cell(family, kind, strategy):
    run_cell(family, kind, strategy)


if __name__ == "__main__":  # the README's table: one row per family and task kind
    for family in FAMILIES:
        for kind in KINDS:
            results = {s: run_cell(family, kind, s) for s in STRATEGIES}
            if set(results.values()) == {"n/a"}:
                continue
            row = " | ".join("ok" if r == "ok" else "refused" if r.startswith("refused") else r for r in results.values())
            print(f"| {family} | {kind} | {row} |", file=sys.stdout)
