"""Sequence to sequence: a source text -> a target text with an encoder-decoder model
(`AutoModelForSeq2SeqLM`: T5, BART, ...), for summarization and translation.

Data: built-in `samsum` and `cnn_dailymail` (from the hub), or the user's files with
`source_column` and `target_column` (default `source`, `target`), optionally `references_column` (every reference of an example, scored against
all of them; e.g. SciTLDR's validation `references`) and a `source_prefix` put before each
source (T5's "summarize: "). The loss is the decoder's over the target tokens; evaluation
reports it with perplexity, then generates for the validation sources (`max_new_tokens`,
`num_beams`; the first `max_generate_samples`) and scores ROUGE-1/2/L (`rouge-score`), BLEU
(`sacrebleu`) and exact match against every reference; the generations are saved. The
model's own output layer is kept (nothing new trains beside a strategy), as for causal LMs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.anatomy import unwrap_peft
from peftkit.data import cap_samples, read_splits, require_columns
from peftkit.errors import PeftkitError
from peftkit.memory.sizes import model_sizes
from peftkit.options import Seq2SeqOptions
from peftkit.tasks.base import (DATASETS, BuiltinDataset, Evaluation, Prepared, Reply, Task, TaskData,
                                cut_by_truncation, generation_summary, language_model_loss, references_of,
                                register_task, rows_to_generate, take_truncation_counts)
from peftkit.tasks.sft import score_generations

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig
    from peftkit.record import RunRecord

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")

# Hub summarization sets by name (a hub is needed: none is in ../shared/data), their columns
# renamed onto ours; their labelled test splits are reported too. T5 wants --set source_prefix="summarize: ".
DATASETS["samsum"] = BuiltinDataset("seq2seq", {}, hub=("Samsung/samsum",),
                                    hub_columns={"dialogue": "source", "summary": "target"}, hub_test=True)
DATASETS["cnn_dailymail"] = BuiltinDataset("seq2seq", {}, hub=("abisee/cnn_dailymail", "3.0.0"),
                                           hub_columns={"article": "source", "highlights": "target"}, hub_test=True)


@register_task("seq2seq")
class SequenceToSequence(Task):
    description = "a source text -> a target text with an encoder-decoder (T5, BART): summarization, translation"
    model_class = "AutoModelForSeq2SeqLM"
    model_suffix = "ForConditionalGeneration"
    peft_task_type = "SEQ_2_SEQ_LM"
    metrics = ("loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "exact_match")
    selects = "loss"
    primary = "rouge_l"
    table_metrics = ("rouge_l", "rouge_1", "rouge_2", "bleu")
    pretrained_head = True
    generates_text = True
    default_max_length = 512
    options = Seq2SeqOptions
    prediction_fields = ("source", "references", "generated")

    def owns(self, model: nn.Module) -> bool:
        return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)) and super().owns(model)

    def check_config(self, config: RunConfig, strategy: Any) -> None:
        config.max_target_length = config.max_target_length or 128
        config.num_beams = config.num_beams or 1

    def output_memory(self, config: Any, batch_size: int, seq_len: int, eval_batch_size: int, eval_seq_len: int,
                      bytes_per_value: int, device: str, max_new_tokens: int, answer_tokens: int | None = None,
                      eval_answer_tokens: int | None = None, num_beams: int = 1,
                      generation_batch: tuple[int, int] = (1, 1)) -> dict[str, int]:
        """The vocabulary-size logits of every target position (`answer_tokens`: the longest
        target; default the source length) and their cross-entropy: training keeps the fp32
        log-probabilities for backward, which adds their gradient and the logits' (and, under
        bf16, the logits' fp32 copy and bf16 gradient); the evaluation loss holds the logits
        and their log-probabilities. Generation keeps, per beam, the encoder's output and every
        decoder layer's cross-attention keys and values over the source and its own over the
        generated tokens."""
        h, _, head_dim, kv, _ = model_sizes(config)
        half = bytes_per_value != 4
        train_positions = batch_size * (answer_tokens or seq_len) * config.vocab_size
        eval_positions = eval_batch_size * (eval_answer_tokens or eval_seq_len) * config.vocab_size
        layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) \
            or config.num_hidden_layers
        beams = eval_batch_size * num_beams
        generation = beams * (eval_seq_len * h + layers * 2 * kv * head_dim * (eval_seq_len + max_new_tokens)) \
            * bytes_per_value
        return {"output_layer": train_positions * (12 + (bytes_per_value if half else 0)),
                "evaluation_output": max(eval_positions * (bytes_per_value + 4 + (4 if half else 0)), generation)}

    def estimate_options(self, config: RunConfig) -> dict[str, Any]:
        """The tokens and beams it generates, and its targets' length before a run has measured them."""
        return {**super().estimate_options(config), "max_new_tokens": config.max_new_tokens,
                "num_beams": config.num_beams or 1, "max_target_length": config.max_target_length}

    def longest_answers(self, prepared: Prepared, config: RunConfig) -> dict[str, int]:
        """The longest target of the training split and of the evaluated ones (selection,
        validation, test): the decoder's length, and the logits' rows."""
        evaluated = [split for name, split in prepared.splits.items() if name != "train"]
        return {"longest_train_answer": max(map(len, prepared.train["labels"])),
                "longest_eval_answer": max(max(map(len, split["labels"]), default=0) for split in evaluated)}

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        """Checked splits with `source`, `target` and `references` (a list) columns."""
        splits = read_splits(config, dataset)
        source, target = config.source_column or "source", config.target_column or "target"
        references = config.references_column
        require_columns(splits, [source, target], "name them with --set source_column=... target_column=...")
        splits = cap_samples(splits, config)

        def standard(row: dict[str, Any], index: int, split: str) -> dict[str, Any]:
            if not isinstance(row[source], str) or not isinstance(row[target], str):
                raise PeftkitError(f"{split} row {index}: source and target must be text")
            return {"source": (config.source_prefix or "") + row[source], "target": row[target],
                    "references": references_of(row, references, row[target], split, index)}

        splits = {split: data.map(lambda row, i, split=split: standard(row, i, split), with_indices=True,
                                  remove_columns=data.column_names) for split, data in splits.items()}
        return TaskData(splits["train"], splits["validation"],
                        {"columns": {"source": source, "target": target, "references": references},
                         "source_prefix": config.source_prefix}, test=splits.get("test"))

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        from peftkit.models import load_pretrained

        return load_pretrained(self.model_class, source, quantization, weights.get("dtype"), None,
                               weights.get("attn_implementation"))

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Source ids (cut at `max_length`) and target ids as labels (cut at `max_target_length`)."""
        target_length = config.max_target_length

        def encode(batch: dict[str, list]) -> dict[str, list]:
            sources, targets = batch["source"], batch["target"]
            out = tokenizer(sources, truncation=True, max_length=config.max_length)
            out["labels"] = tokenizer(text_target=targets, truncation=True, max_length=target_length)["input_ids"]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            cut = cut_by_truncation(out["length"], config.max_length, lambda rows: [
                len(ids) for ids in tokenizer([sources[i] for i in rows], verbose=False)["input_ids"]])
            cut |= cut_by_truncation([len(ids) for ids in out["labels"]], target_length, lambda rows: [
                len(ids) for ids in tokenizer(text_target=[targets[i] for i in rows], verbose=False)["input_ids"]])
            out["truncated"] = [int(i in cut) for i in range(len(sources))]
            return out

        splits, truncated = take_truncation_counts({
            name: split.map(encode, batched=True, remove_columns=split.column_names)
            for name, split in data.splits().items()})
        return Prepared(splits, data.splits(), {**data.info, "truncated_examples": truncated})

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        from peftkit.trainer import timed_trainer

        return timed_trainer(model, config, scratch_dir, tokenizer, PadPairs(tokenizer, model), strategy, prepared.train,
                             prepared.selection, callbacks)

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Loss and perplexity over the target tokens, then generation for the sources (the
        first `max_generate_samples`), scored against every reference and kept."""
        from peftkit.trainer import evaluate_once, timed_trainer

        loss = evaluate_once(lambda scratch: timed_trainer(model, config, scratch, tokenizer, PadPairs(tokenizer, model),
                                                           evaluation=prepared.splits[split]))["loss"]
        metrics = language_model_loss(loss)
        chosen = rows_to_generate(prepared.raw[split], config)
        if len(chosen) == 0:
            return Evaluation(metrics)
        replies = generate(model, tokenizer, chosen["source"], config.max_new_tokens, config.eval_batch_size,
                           config.num_beams, config.max_length)
        metrics |= score_generations([reply.text for reply in replies], chosen["references"])
        predictions = [{"source": s, "references": r, "generated": g.text, "finished": g.finished}
                       for s, r, g in zip(chosen["source"], chosen["references"], replies)]
        return Evaluation(metrics, predictions, generation_summary(replies, config.max_new_tokens, split))

    def predict(self, model: nn.Module, tokenizer: Any, record: RunRecord, examples: list[list[str]],
                config: RunConfig) -> list[str]:
        """The generated target for each source (the run's `source_prefix` put before it)."""
        prefix = record.data.get("source_prefix") or ""
        return [reply.text for reply in generate(model, tokenizer, [prefix + "\n\n".join(texts) for texts in examples],
                                                 config.max_new_tokens, config.eval_batch_size, config.num_beams,
                                                 config.max_length)]

    def input_fields(self, record: RunRecord) -> list[str]:
        return ["source"]

    def answer(self, model: nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
               batch_size: int) -> list[Reply]:
        """`peftkit generate`: each conversation's last user message is a source."""
        return generate(model, tokenizer, [c[-1]["content"] for c in conversations], max_new_tokens, batch_size)


def generate(model: nn.Module, tokenizer: Any, sources: list[str], max_new_tokens: int, batch_size: int,
             num_beams: int = 1, max_length: int | None = None) -> list[Reply]:
    """Decoded targets for sources (greedy with one beam, else beam search), batched by
    source length, sources cut at `max_length` tokens when given; a target that reached
    `max_new_tokens` without its end-of-sequence token did not finish."""
    import torch

    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: dict[int, Reply] = {}
    declared = unwrap_peft(model).generation_config.eos_token_id
    ends = set(declared if isinstance(declared, list) else [declared]) - {None}
    was_training = model.training
    model.eval()
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        inputs = tokenizer([sources[i] for i in chunk], truncation=max_length is not None, max_length=max_length,
                           padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**{k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")},
                                 do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens, use_cache=True)
        for index, ids in zip(chunk, out):
            tokens = ids[1:].tolist()  # after the decoder's start token
            outputs[index] = Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                   finished=len(tokens) < max_new_tokens or bool(ends & set(tokens)))
    model.train(was_training)
    return [outputs[i] for i in range(len(sources))]


class PadPairs:
    """Pads sources and targets to each batch's longest (targets with -100) and builds the
    decoder's inputs from the targets, as the model does (transformers' seq2seq collator)."""

    def __init__(self, tokenizer: Any, model: nn.Module):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, model=unwrap_peft(model))  # its prepare_decoder_input_ids_from_labels

    def __call__(self, features: list[dict]) -> dict:
        return self.pad([{k: v for k, v in f.items() if k in MODEL_INPUTS} for f in features])
