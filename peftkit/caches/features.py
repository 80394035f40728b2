"""Frozen features, computed once: what the task head sees, for every example.

When only the head trains (linear probing), the encoder's output never changes, so running it
every step of every epoch is waste. The head's inputs are computed once in evaluation mode (no
dropout in the frozen part), in batches sorted by length, and kept on disk under a key that
names everything they depend on: the model's files, the tokenizer, the data, the maximum
length. A cache built for anything else is never reused.

Heads that read one vector per example (BERT's classifier on the pooled output) are cached
as is. Decoder heads (`score`) run on every position and the model then takes the logits of
the last non-padding token; since the head is linear, taking that token's hidden state first
is the same thing, and that vector is what is cached. A token classifier's loss reads only the
labelled tokens (each word's first sub-token), so their hidden states are what is cached, one
row per labelled token, in order.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from peftkit.anatomy import inspect_model
from peftkit.models import cache_dir

FORMAT_VERSION = 2  # 2: each stored value keeps the seconds it took to compute


def cache_key(model_dir: str, tokenizer: Any, dataset: Any, max_length: int, site: str, variant: str = "") -> str:
    """A digest of everything the features depend on. The tokenized dataset's fingerprint
    covers the raw data, the text columns and the tokenization; the tokenizer and maximum
    length are named again so that no fingerprint subtlety can hide a change in them."""
    digest = hashlib.sha256()
    parts = {
        "format": FORMAT_VERSION,
        "model_files": _file_signatures(Path(model_dir)),
        "tokenizer": _tokenizer_signature(tokenizer),
        "data": dataset._fingerprint,
        "max_length": max_length,
        "site": site,  # the module whose input or output is cached
        "variant": variant,  # options that change what is cached (pooling, quantization)
    }
    digest.update(json.dumps(parts, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _file_signatures(directory: Path) -> list[tuple[str, int, str]]:
    """Name, size and content hash of the checkpoint's config and weight files."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".gguf"))
    return [(p.name, p.stat().st_size, _sha256(p)) for p in files]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_signature(tokenizer: Any) -> str:
    """Vocabulary, rules and special tokens; not the truncation/padding state, which the
    tokenizer changes on itself whenever it is called with those arguments."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        spec = {"vocab": tokenizer.get_vocab()}
    spec |= {"class": type(tokenizer).__name__, "padding_side": tokenizer.padding_side,
             "special": tokenizer.all_special_tokens}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def head_inputs(model: nn.Module, dataset: Any, collate: Any, batch_size: int) -> torch.Tensor | list[torch.Tensor]:
    """What the head turns into logits, in dataset order: one row per example, or for labels
    per token (token classification), per example the rows of its labelled tokens."""
    anatomy = inspect_model(model)
    head = model.get_submodule(anatomy.head_modules[0])
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    order = sorted(range(len(dataset)), key=lambda i: dataset[i]["length"])
    rows: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = collate([dataset[i] for i in order[start:start + batch_size]])
                labels = batch.pop("labels", None)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                captured.clear()
                model(**batch)
                if labels is not None and labels.dim() == 2:  # per token: each example's labelled rows
                    rows += [hidden[keep].float().cpu() for hidden, keep in zip(captured[0], labels.to(model.device) != -100)]
                else:
                    rows += list(_pool(captured[0], batch, model).float().cpu())
    finally:
        hook.remove()
        model.train(was_training)
    restored: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for position, row in zip(order, rows):
        restored[position] = row
    return restored if restored and restored[0].dim() == 2 else torch.stack(restored)


def _pool(head_input: torch.Tensor, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    if head_input.dim() == 2:
        return head_input
    pad = model.config.pad_token_id
    non_pad = (batch["input_ids"] != pad).int()
    positions = torch.arange(non_pad.shape[-1], device=non_pad.device)
    last = (positions * non_pad).argmax(-1)  # the token transformers' decoder classifiers read
    return head_input[torch.arange(head_input.shape[0]), last]


def cached_head_inputs(store: FeatureStore, model: nn.Module, model_dir: str, tokenizer: Any, dataset: Any,
                       collate: Any, max_length: int, batch_size: int, variant: str = "") -> torch.Tensor:
    """`head_inputs`, read from the store when an identical computation was stored before."""
    head = inspect_model(model).head_modules[0]
    key = cache_key(model_dir, tokenizer, dataset, max_length, head, variant)
    return store.get(key, lambda: head_inputs(model, dataset, collate, batch_size))


class FeatureStore:
    """Frozen computations kept on disk, and what one run did with them. `get(key, compute)`
    returns what `compute` returns: read back when an identical computation was stored
    before, else computed and stored atomically (a staging file renamed into place, so that a
    killed run leaves no torn file). Each stored value keeps the seconds its computation took,
    so a run that reads it back still counts that work in its training time (`seconds`), and
    `source` says whether this run computed its features or loaded them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.computed = self.loaded = 0

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        path = cache_dir() / "features" / f"{key}.pt"
        if path.is_file():
            stored = torch.load(path)
            self.loaded += 1
            self.seconds += stored["seconds"]
            return stored["value"]
        start = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{torch.randint(1 << 30, ()).item()}.tmp")
        torch.save({"value": value, "seconds": seconds}, staging)
        staging.rename(path)
        self.computed += 1
        self.seconds += seconds
        return value

    @property
    def source(self) -> str | None:
        """"computed", "loaded" (from an earlier run's identical computation), "partly loaded", or None."""
        if not self.computed + self.loaded:
            return None
        return "computed" if not self.loaded else "loaded" if not self.computed else "partly loaded"


class HeadOnFeatures(nn.Module):
    """The model's own head module, trained on cached features (its parameters are shared
    with the full model, so saving the full model saves what was trained here)."""

    def __init__(self, head: nn.Module, num_labels: int):
        super().__init__()
        self.head, self.num_labels = head, num_labels

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return out


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features with their labels: one vector and label per example, or per example
    the rows of its labelled tokens and their labels (the -100 of unlabelled tokens dropped,
    as their rows were). `collate` batches either kind."""

    def __init__(self, features: torch.Tensor | list[torch.Tensor], labels: list[int] | list[list[int]]):
        self.features = features
        self.labels = [torch.tensor([v for v in row if v != -100]) for row in labels] \
            if isinstance(features, list) else torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stacked vectors, or token rows padded to the batch's longest example (labels with -100)."""
        if not isinstance(self.features, list):
            return {"features": torch.stack([i["features"] for i in items]), "labels": torch.stack([i["labels"] for i in items])}
        return {"features": pad_sequence([i["features"] for i in items], batch_first=True),
                "labels": pad_sequence([i["labels"] for i in items], batch_first=True, padding_value=-100)}
