"""Token classification (named-entity recognition): a tag for every word, through a new head
on every token (`AutoModelForTokenClassification`).

Data: built-in `conll2003`, `wnut17`, or the user's files with `--tokens-column` (a list of
words per example) and `--tags-column` (one tag per word: strings such as `B-PER`, or
integers named by `tag_names` or by the data's own class-label feature). Words are split
into sub-word tokens; each word's first sub-token carries its tag and the rest are ignored
(label -100), as in transformers' token-classification examples.

Metrics: entity-level precision, recall and F1 as `seqeval` computes them in its default
mode (the CoNLL-2000 `conlleval` rules over IOB tags: an entity is a B-/I- run of one type,
and an I- after another type starts a new entity), micro-averaged over entities (F1
selects) and per entity type in the run record (`PER/f1`, ...); token accuracy besides.
Scores are over the words that fit in `max_length` (the record counts the examples cut).
Training, feature caching and the strategies are sequence classification's (the head reads
every token instead of one vector); linear probing caches the labelled tokens' features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from peftkit.data import cap_samples, read_splits, require_columns
from peftkit.errors import PeftkitError
from peftkit.options import TokenClassificationOptions
from peftkit.tasks.base import DATASETS, BuiltinDataset, Prepared, Task, TaskData, register_task, take_truncation_counts
from peftkit.tasks.classification import MODEL_INPUTS, Classification

if TYPE_CHECKING:
    from peftkit.options import RunConfig
    from peftkit.record import RunRecord

SCHEME = "IOB tags, entities as seqeval's default (conlleval) mode reads them; micro average"

DATASETS["conll2003"] = BuiltinDataset("token-classification", {"tokens_column": "tokens", "tags_column": "ner_tags"},
                                       hub=("eriktks/conll2003",), hub_test=True)
DATASETS["wnut17"] = BuiltinDataset("token-classification", {"tokens_column": "tokens", "tags_column": "ner_tags"},
                                    hub=("leondz/wnut_17",), hub_test=True)


@register_task("token-classification")
class TokenClassification(Classification):
    description = "a list of words -> a tag per word, e.g. named entities (new head on every token)"
    model_class = "AutoModelForTokenClassification"
    model_suffix = "ForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    metrics = ("f1", "precision", "recall", "accuracy", "loss")
    selects = "f1"
    primary = "f1"
    table_metrics = ("f1", "precision", "recall")
    default_max_length = 256
    options = TokenClassificationOptions
    reads_one_vector = False

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        """Checked splits with a `tokens` column (words) and integer `labels` (one per word)."""
        splits = read_splits(config, dataset)
        defaults = dataset.columns if dataset and config.train_file is None else {}
        tokens_column = config.tokens_column or defaults.get("tokens_column", "tokens")
        tags_column = config.tags_column or defaults.get("tags_column", "ner_tags")
        require_columns(splits, [tokens_column, tags_column], "name them with --tokens-column/--tags-column")
        names = config.tag_names or _class_label_names(splits["train"].features[tags_column])
        # the tag set is the whole training split's, so a capped run has the same head and names
        label_names, index = tag_encoding([t for row in splits["train"][tags_column] if isinstance(row, list)
                                           for t in row], names)
        splits = cap_samples(splits, config)
        for split, data in splits.items():
            _check_rows(split, data[tokens_column], data[tags_column], tokens_column, tags_column)
        for split, data in splits.items():
            for row, tags in enumerate(data[tags_column]):
                unknown = next((t for t in tags if t not in index), None)
                if unknown is not None:
                    raise PeftkitError(f"{split} row {row}: tag {unknown!r} is not in the training data's tag set "
                                       f"{label_names}; fix the data or train on data that has this tag")
            encoded = data.map(lambda b: {"tokens": b[tokens_column], "labels": [[index[t] for t in tags] for tags in b[tags_column]]},
                               batched=True, remove_columns=data.column_names)
            splits[split] = encoded
        return TaskData(splits["train"], splits["validation"], {"label_names": label_names, "scheme": SCHEME},
                        test=splits.get("test"))

    def hold_out_selection(self, data: TaskData, config: RunConfig) -> None:
        Task.hold_out_selection(self, data, config)  # no single label per example to stratify by

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Sub-word ids per split with each word's tag on its first sub-token."""
        if not getattr(tokenizer, "is_fast", False):
            raise PeftkitError(f"token classification needs a fast tokenizer (it maps sub-words to words); "
                               f"{type(tokenizer).__name__} is not one: use a model with a tokenizer.json")
        splits, truncated = take_truncation_counts({
            name: tokenize_words(split, tokenizer, config.max_length, sort=name != "train")
            for name, split in data.splits().items()})
        return Prepared(splits, data.splits(), {**data.info, "truncated_examples": truncated})

    def feature_rows(self, prepared: Prepared) -> dict[str, int]:
        """One vector per labelled token (each word's first sub-token) of the training split
        and the selection slice: what a linear probe caches (peftkit.caches.features)."""
        splits = [s for s in (prepared.train, prepared.selection) if s is not None]
        return {"cached_feature_rows": sum(sum(label != -100 for label in labels) for split in splits
                                           for labels in split["labels"])}

    def collator(self, tokenizer: Any) -> Any:
        return PadWithLabels(tokenizer)

    def reduce_logits(self, logits: Any, labels: Any) -> Any:
        """Each token's best tag, instead of every tag's logit (gathered over the whole split)."""
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)

    def metric_function(self, info: dict[str, Any]) -> Callable[[Any], dict[str, float]]:
        names = info["label_names"]

        def compute(eval_pred: Any) -> dict[str, float]:
            true, predicted = [], []
            for tags, labels in zip(np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)):
                keep = labels != -100  # each word's first sub-token; padding and later sub-tokens are -100
                true.append([names[i] for i in labels[keep]])
                predicted.append([names[i] for i in tags[keep]])
            return entity_scores(true, predicted)

        return compute

    def records_metric(self, name: str) -> bool:
        return name in self.metrics or "/" in name  # and per entity type: PER/f1, PER/precision, ...

    def predict(self, model: Any, tokenizer: Any, record: RunRecord, examples: list[list[str]],
                config: RunConfig) -> list[str]:
        """The entities of each sentence (words split on white space), "TYPE: words" joined by
        "; ", or "(no entities)"."""
        import torch
        from seqeval.metrics.sequence_labeling import get_entities

        names = record.data["label_names"]
        lines = []
        for first in range(0, len(examples), config.eval_batch_size):
            sentences = [example[0].split() for example in examples[first: first + config.eval_batch_size]]
            inputs = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=config.max_length,
                               padding=True, return_tensors="pt")
            with torch.no_grad():
                best = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.argmax(-1).cpu()
            for row, words in enumerate(sentences):
                tags = ["O"] * len(words)  # words cut at max_length stay untagged
                for position, label in enumerate(align_labels(inputs.word_ids(row), list(range(len(words))))):
                    if label != -100:  # the word's first sub-token
                        tags[label] = names[int(best[row, position])]
                entities = [f"{kind}: {' '.join(words[start:end + 1])}" for kind, start, end in get_entities(tags)]
                lines.append("; ".join(entities) or "(no entities)")
        return lines

    def input_fields(self, record: RunRecord) -> list[str]:
        return ["text"]


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """One label per sub-word token: each word's first sub-token carries the word's label;
    special tokens and a word's later sub-tokens get -100 (ignored by the loss and the metrics)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def tokenize_words(dataset: Any, tokenizer: Any, max_length: int, sort: bool = False) -> Any:
    """Token ids, aligned labels and a `length` column per example, truncated at `max_length`;
    `truncated` (0/1) says which examples lost words to it. `sort=True` orders by length."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        out["labels"], out["truncated"] = [], []
        for row, tags in enumerate(batch["labels"]):
            word_ids = out.word_ids(row)
            out["labels"].append(align_labels(word_ids, tags))
            words_kept = max((w for w in word_ids if w is not None), default=-1) + 1
            out["truncated"].append(int(words_kept < len(tags)))
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    return encoded.sort("length") if sort else encoded


class PadWithLabels:
    """Pads each batch to its longest example, the labels with -100; passes only model inputs,
    labels and the example index a replayed frozen bottom reads (peftkit.caches.bottom)."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorForTokenClassification

        self.pad = DataCollatorForTokenClassification(tokenizer)

    def __call__(self, features: list[dict]) -> dict:
        from peftkit.caches.bottom import INDEX_COLUMN

        keep = (*MODEL_INPUTS, "labels", INDEX_COLUMN)
        return self.pad([{k: v for k, v in f.items() if k in keep} for f in features])


def entity_scores(true: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval, default mode), the same per entity
    type (`TYPE/f1`, ...), and token accuracy, for tag sequences aligned word by word."""
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(true, predicted, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    scores = {"precision": float(micro["precision"]), "recall": float(micro["recall"]), "f1": float(micro["f1-score"]),
              "accuracy": float(accuracy_score(true, predicted))}
    for kind, values in report.items():
        if not kind.endswith(" avg"):
            scores |= {f"{kind}/precision": float(values["precision"]), f"{kind}/recall": float(values["recall"]),
                       f"{kind}/f1": float(values["f1-score"])}
    return scores


def tag_encoding(train_tags: list[Any], names: list[str] | None) -> tuple[list[str], dict[Any, int]]:
    """The tag names and a tag -> index map. String tags are named by themselves ("O" first,
    then sorted); integer tags need their names (`tag_names`, or the data's class-label feature)."""
    values = set(train_tags)
    if any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in values):
        raise PeftkitError(f"tags must be strings or integers, found {sorted(map(repr, values))[:5]}")
    if {type(v) for v in values} == {int, str}:
        raise PeftkitError("tags mix integers and strings: use one type in the tags column")
    if values and isinstance(next(iter(values)), int):
        if names is None:
            raise PeftkitError("the tags are integers and nothing names them: give their names in order, "
                               "e.g. --set tag_names=[O,B-PER,I-PER], or use string tags")
        if max(values) >= len(names) or min(values) < 0:
            raise PeftkitError(f"tag {max(values) if max(values) >= len(names) else min(values)} has no name: "
                               f"tag_names has {len(names)} ({', '.join(names)})")
        return list(names), {i: i for i in range(len(names))}
    if names is not None:
        raise PeftkitError("tag_names names integer tags, and these tags are strings already: drop tag_names")
    ordered = sorted(values, key=lambda tag: (tag != "O", tag))
    return ordered, {tag: i for i, tag in enumerate(ordered)}


def _class_label_names(feature: Any) -> list[str] | None:
    """The names of a sequence of class labels (a hub data set's integer tags), else None."""
    inner = getattr(feature, "feature", None)
    return list(inner.names) if hasattr(inner, "names") else None


def _check_rows(split: str, tokens: list[Any], tags: list[Any], tokens_column: str, tags_column: str) -> None:
    for row, (words, labels) in enumerate(zip(tokens, tags)):
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise PeftkitError(f"{split} row {row}: column '{tokens_column}' must be a list of words (strings), "
                               f"got {str(words)[:60]}")
        if not isinstance(labels, list) or len(labels) != len(words):
            count = len(labels) if isinstance(labels, list) else "no list of"
            raise PeftkitError(f"{split} row {row}: {len(words)} words in '{tokens_column}' but {count} tags in "
                               f"'{tags_column}': give one tag per word")
