"""Extractive question answering: a question and a context -> the answer's span in the
context, through a new start/end head on every token (`AutoModelForQuestionAnswering`).

Data: built-in `squad`, or the user's files in SQuAD's format: `question`, `context` and
`answers` (`{"text": [...], "answer_start": [...]}`, character offsets; several references
per question allowed), other names with `--set question_column=... context_column=...
answers_column=...`. A context longer than `max_length` is split into overlapping windows
(`doc_stride` tokens shared between neighbours); a training window that holds the (first)
answer whole is labelled with its start and end tokens, one that does not points at the
first token ([CLS]), as in transformers' SQuAD example. Evaluation takes, over all windows
of a question, the best-scoring span (start logit + end logit, end not before start, at most
`MAX_ANSWER_TOKENS` tokens, inside the context) and maps it back to the context's characters.
Metrics: SQuAD v1.1's exact match and F1 (F1 selects), against every reference answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from peftkit.anatomy import inspect_model
from peftkit.data import cap_samples, read_splits, require_columns
from peftkit.errors import PeftkitError
from peftkit.options import QAOptions
from peftkit.tasks.base import DATASETS, BuiltinDataset, Evaluation, Prepared, Task, TaskData, register_task
from peftkit.text_metrics import squad_scores

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig
    from peftkit.record import RunRecord

DATASETS["squad"] = BuiltinDataset("qa", {"question_column": "question", "context_column": "context",
                                          "answers_column": "answers"}, hub=("rajpurkar/squad",))

TARGETS = ("start_positions", "end_positions")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", *TARGETS)
MAX_ANSWER_TOKENS = 30  # the longest span considered (SQuAD's answers are short)
CANDIDATES = 20         # the best start and end tokens of each window that are paired up


@register_task("qa")
class ExtractiveQA(Task):
    description = "a question and a context -> the answer's span in the context (new start/end head)"
    model_class = "AutoModelForQuestionAnswering"
    model_suffix = "ForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    metrics = ("f1", "exact_match", "loss")
    selects = "f1"
    primary = "f1"
    table_metrics = ("f1", "exact_match")
    default_max_length = 384
    options = QAOptions
    prediction_fields = ("question", "answers", "prediction")

    def check_config(self, config: RunConfig, strategy: Any) -> None:
        if config.doc_stride is None:
            config.doc_stride = config.max_length // 3  # 128 at the default 384, as in transformers' SQuAD example
        if config.doc_stride >= config.max_length // 2:
            raise PeftkitError(f"doc_stride {config.doc_stride} must be under half of max_length {config.max_length}: "
                               "neighbouring windows share doc_stride tokens and each must also move on")

    def trained_beside(self, model: nn.Module) -> tuple[str, ...]:
        return inspect_model(model).head_modules

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        """Checked splits with `id`, `question`, `context` and `answers` columns."""
        splits = read_splits(config, dataset)
        names = {"question": config.question_column or "question", "context": config.context_column or "context",
                 "answers": config.answers_column or "answers"}
        require_columns(splits, list(names.values()), "name them with --set question_column=... context_column=... "
                                                      "answers_column=...")
        splits = cap_samples(splits, config)
        for split, data in splits.items():
            for row, (context, answers) in enumerate(zip(data[names["context"]], data[names["answers"]])):
                _check_answers(split, row, context, answers, names["answers"])

        def standard(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            ids = batch["id"] if "id" in batch else [str(i) for i in indices]
            return {"id": [str(i) for i in ids], "question": batch[names["question"]],
                    "context": batch[names["context"]], "answers": batch[names["answers"]]}

        splits = {split: data.map(standard, batched=True, with_indices=True, remove_columns=data.column_names)
                  for split, data in splits.items()}
        return TaskData(splits["train"], splits["validation"], {"answer_rule": "best span over all windows, "
                        f"at most {MAX_ANSWER_TOKENS} tokens; SQuAD v1.1 exact match and F1, best over references"},
                        test=splits.get("test"))

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        from peftkit.models import head_modules, load_pretrained

        head = head_modules(source, {}, self.model_class)
        return load_pretrained(self.model_class, source, quantization, weights.get("dtype"),
                               head if quantization is not None else None, weights.get("attn_implementation"),
                               new_head=head, unused=("pooler",),  # the span head reads tokens, not the pooled vector
                               pad_token_id=tokenizer.pad_token_id)

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Windows of every split, each with its answer's token positions, its example's index
        and the character offsets of its context tokens."""
        if not getattr(tokenizer, "is_fast", False):
            raise PeftkitError(f"extractive QA needs a fast tokenizer (it maps tokens to characters); "
                               f"{type(tokenizer).__name__} is not one: use a model with a tokenizer.json")
        splits = {name: windows(split, tokenizer, config.max_length, config.doc_stride)
                  for name, split in data.splits().items()}
        counts = {name: len(split) for name, split in splits.items()}
        return Prepared(splits, data.splits(), {**data.info, "windows": counts})

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        from peftkit.trainer import timed_trainer

        selection = prepared.selection
        return timed_trainer(model, config, scratch_dir, tokenizer, PadWindows(tokenizer), strategy, prepared.train,
                             selection, callbacks, label_names=TARGETS,
                             compute_metrics=None if selection is None else span_metrics(selection, prepared.raw["selection"]))

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Exact match and F1 of the best span per question, the loss over the windows, and
        each question's predicted answer."""
        from peftkit.trainer import evaluate_once, timed_trainer

        predicted: list[str] = []
        metrics = evaluate_once(lambda scratch: timed_trainer(
            model, config, scratch, tokenizer, PadWindows(tokenizer), evaluation=prepared.splits[split], label_names=TARGETS,
            compute_metrics=span_metrics(prepared.splits[split], prepared.raw[split], keep=predicted)))
        raw = prepared.raw[split]
        predictions = [{"id": i, "question": q, "prediction": p, "answers": a["text"]}
                       for i, q, p, a in zip(raw["id"], raw["question"], predicted, raw["answers"])]
        return Evaluation({k: v for k, v in metrics.items() if k in self.metrics}, predictions)

    def predict(self, model: nn.Module, tokenizer: Any, record: RunRecord, examples: list[list[str]],
                config: RunConfig) -> list[str]:
        """The answer span for each (question, context)."""
        import torch
        from datasets import Dataset

        for example in examples:
            if len(example) != 2:
                raise PeftkitError(f"a QA input is a question and a context; got {len(example)} text(s)")
        raw = Dataset.from_dict({"question": [e[0] for e in examples], "context": [e[1] for e in examples],
                                 "answers": [{"text": [""], "answer_start": [0]}] * len(examples)})
        features = windows(raw, tokenizer, config.max_length, config.doc_stride)
        collate, starts, ends = PadWindows(tokenizer), [], []
        for first in range(0, len(features), config.eval_batch_size):
            batch = collate([features[i] for i in range(first, min(first + config.eval_batch_size, len(features)))])
            batch = {k: v.to(model.device) for k, v in batch.items() if k not in TARGETS}
            with torch.no_grad():
                out = model(**batch)
            starts += list(out.start_logits.float().cpu().numpy())
            ends += list(out.end_logits.float().cpu().numpy())
        return best_answers(starts, ends, features["offset_mapping"], features["example_index"], raw["context"])

    def input_fields(self, record: RunRecord) -> list[str]:
        return ["question", "context"]


def windows(dataset: Any, tokenizer: Any, max_length: int, doc_stride: int) -> Any:
    """One row per window of each example's context (question first, context cut into
    `max_length` windows overlapping by `doc_stride` tokens): token ids, the answer's start
    and end token (the first token when the window lacks the whole answer), `example_index`,
    the character span of every context token (None elsewhere) and a `length` column."""

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        source = out.pop("overflow_to_sample_mapping")
        out["start_positions"], out["end_positions"], out["example_index"] = [], [], []
        for window, offsets in enumerate(out["offset_mapping"]):
            in_context = [sequence == 1 for sequence in out.sequence_ids(window)]
            answers = batch["answers"][source[window]]
            start_char = answers["answer_start"][0]
            start, end = answer_tokens(offsets, in_context, start_char, start_char + len(answers["text"][0]))
            out["start_positions"].append(start)
            out["end_positions"].append(end)
            out["example_index"].append(indices[source[window]])
            out["offset_mapping"][window] = [span if inside else None for span, inside in zip(offsets, in_context)]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    try:
        return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names)
    except Exception as err:
        if "truncation" in str(err).lower() or "too short" in str(err).lower():
            raise PeftkitError(f"a question does not fit in max_length {max_length} with room for its context: "
                               "raise max_length or shorten the question") from None
        raise


def answer_tokens(offsets: list[tuple[int, int]], in_context: list[bool], start_char: int, end_char: int) -> tuple[int, int]:
    """The first and last token of the characters [start_char, end_char) in a window, or
    (0, 0) when the window's context does not hold them whole."""
    context = [i for i, inside in enumerate(in_context) if inside]
    if end_char <= start_char or not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def best_answers(start_logits: list[Any], end_logits: list[Any], offsets: list[list[Any]], example_index: list[int],
                 contexts: list[str]) -> list[str]:
    """For each example, the context text of its best span over all its windows: the
    `CANDIDATES` best start and end tokens of each window are paired, spans outside the
    context, ending before they start or longer than `MAX_ANSWER_TOKENS` dropped, and the
    highest start + end logit wins ("" when no window has a valid span)."""
    best: dict[int, tuple[float, str]] = {}
    for starts, ends, spans, example in zip(start_logits, end_logits, offsets, example_index):
        starts, ends = np.asarray(starts)[:len(spans)], np.asarray(ends)[:len(spans)]
        for s in np.argsort(starts)[::-1][:CANDIDATES]:
            for e in np.argsort(ends)[::-1][:CANDIDATES]:
                if spans[s] is None or spans[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                    continue
                score = float(starts[s] + ends[e])
                if example not in best or score > best[example][0]:
                    best[example] = (score, contexts[example][spans[s][0]:spans[e][1]])
    return [best.get(i, (0.0, ""))[1] for i in range(len(contexts))]


def span_metrics(features: Any, raw: Any, keep: list[str] | None = None) -> Any:
    """compute_metrics for Trainer over these windows of these examples: the best answers'
    SQuAD exact match and F1 (the answers are appended to `keep` when given)."""

    offsets, example_index, contexts = features["offset_mapping"], features["example_index"], raw["context"]
    references = [answers["text"] for answers in raw["answers"]]

    def compute(eval_pred: Any) -> dict[str, float]:
        start_logits, end_logits = eval_pred.predictions[:2]
        answers = best_answers(list(start_logits), list(end_logits), offsets, example_index, contexts)
        if keep is not None:
            keep[:] = answers
        return squad_scores(answers, references)

    return compute


class PadWindows:
    """Pads each batch of windows to its longest; passes only model inputs and answer positions."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict]) -> dict:
        return self.pad([{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features])


def _check_answers(split: str, row: int, context: Any, answers: Any, column: str) -> None:
    """SQuAD's answer format, and every answer where its offset says it is."""
    if not isinstance(context, str):
        raise PeftkitError(f"{split} row {row}: the context must be text, got {type(context).__name__}")
    if not (isinstance(answers, dict) and isinstance(answers.get("text"), list)
            and isinstance(answers.get("answer_start"), list) and len(answers["text"]) == len(answers["answer_start"])):
        raise PeftkitError(f"{split} row {row}: column '{column}' must be {{\"text\": [...], \"answer_start\": [...]}} "
                           "with one start per answer, as in SQuAD")
    if not answers["text"]:
        raise PeftkitError(f"{split} row {row}: no answer; extractive QA here is SQuAD v1.1-style (every question "
                           "has an answer in its context)")
    for text, start in zip(answers["text"], answers["answer_start"]):
        if not isinstance(start, int) or context[start:start + len(text)] != text:
            raise PeftkitError(f"{split} row {row}: answer {text!r} is not at character {start} of the context; "
                               "answer_start must be the character offset of the answer text")
