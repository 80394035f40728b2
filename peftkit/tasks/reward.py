"""Reward models: one score per prompt and reply, learned from preference pairs with TRL's
RewardTrainer (the Bradley-Terry loss -log sigmoid(score chosen - score rejected)).

The model is a sequence classifier with one output (`AutoModelForSequenceClassification`,
num_labels 1) on a causal LM (Llama's `score` reads the last non-padding token; the
checkpoint's LM head is left unused by design) or on an encoder (BERT's `classifier`, through
the run's pooling). The new head trains beside any strategy, linear probing included.
Data: preference pairs (`peftkit.tasks.pairs`: built-in `hh-rlhf-harmless`, `sst2-pref`, as
`reward:DATA-SET`, or your own files), tokenized as TRL's RewardTrainer tokenizes them (the
prompt joined to each reply: a conversation through the chat template, texts with the
end-of-text token after the reply), cut at `max_length` from the right and counted
(`truncated_examples`). Metrics over every pair of a split: `accuracy` (the share whose
chosen reply scores strictly higher; selects), `margin` (mean chosen - rejected score) and
`loss` (the mean Bradley-Terry loss). Dropout stays as the model and strategy set it.
`peftkit predict` scores a prompt and a response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from peftkit.anatomy import inspect_model
from peftkit.data import BuiltinDataset, TaskData
from peftkit.options import RewardOptions
from peftkit.tasks.base import Evaluation, Prepared, Task, register_task, take_truncation_counts
from peftkit.tasks.pairs import load_pairs, margin_summary, prompt_messages
from peftkit.tasks.sft import set_chat_template

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig
    from peftkit.record import RunRecord

SCORE = ["reward"]  # the head's one output, named as a classifier's labels are
SIDES = ("chosen", "rejected")


@register_task("reward")
class RewardModel(Task):
    description = "preference pairs -> a reward model scoring prompt + reply (new one-output head)"
    model_class = "AutoModelForSequenceClassification"
    model_suffix = "ForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    metrics = ("accuracy", "margin", "loss")
    selects = "accuracy"
    primary = "accuracy"
    table_metrics = ("accuracy", "margin")
    options = RewardOptions
    reads = "pairs"
    reads_one_vector = True
    rows_per_example = 2  # the chosen and the rejected sequence of a pair, in one batch
    default_max_length = 512  # an encoder's positions; 66 of hh-rlhf-harmless's 1,700 training pairs are longer

    def trained_beside(self, model: nn.Module) -> tuple[str, ...]:
        return inspect_model(model).head_modules

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        return load_pairs(config, dataset)

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        from peftkit.models import load_for_classification

        return load_for_classification(source, SCORE, tokenizer, quantization, auto_class=self.model_class, **weights)

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Each pair's `chosen_ids` and `rejected_ids` (TRL's RewardTrainer takes them as they
        are), `length` the longer of the two; evaluated splits sorted by it (less padding)."""
        if data.info["data_format"] == "conversational" or config.chat_template is not None:
            set_chat_template(tokenizer, config.chat_template)

        limit = config.max_length

        def encode(pair: dict[str, Any]) -> dict[str, Any]:
            whole = {side: sequence_ids(tokenizer, pair["prompt"], pair[side]) for side in SIDES}
            cut = any(len(ids) > limit for ids in whole.values())
            kept = {f"{side}_ids": ids[:limit] for side, ids in whole.items()}
            return {**kept, "length": max(map(len, kept.values())), "truncated": int(cut)}

        encoded = {name: split.map(encode, remove_columns=split.column_names) for name, split in data.splits().items()}
        splits, truncated = take_truncation_counts({name: split if name == "train" else split.sort("length")
                                                    for name, split in encoded.items()})
        return Prepared(splits, data.splits(), {**data.info, "truncated_examples": truncated})

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        from peftkit.trainer import build_optimizer

        optimizer = build_optimizer(config.optimizer, strategy.param_groups(model, config.lr, config.weight_decay))
        return reward_trainer(model, config, tokenizer, scratch_dir, prepared.train, prepared.selection,
                              optimizers=(optimizer, None), callbacks=callbacks)

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Accuracy, margin and loss over every pair of one split, batched as in training."""
        from peftkit.trainer import evaluate_once

        # RewardTrainer insists on a training set even to evaluate; it never trains here
        metrics = evaluate_once(lambda scratch: reward_trainer(model, config, tokenizer, scratch,
                                                               prepared.splits[split], prepared.splits[split]))
        return Evaluation({name: metrics[name] for name in self.metrics})

    def predict(self, model: nn.Module, tokenizer: Any, record: RunRecord, examples: list[list[str]],
                config: RunConfig) -> list[str]:
        """Each prompt and response's score (4 decimals), the two joined as the run's pairs
        were: a conversation (the prompt the user's turn) or texts; higher is preferred."""
        standard = record.data["data_format"] == "standard"

        def ids(prompt: str, response: str) -> list[int]:
            if standard:
                return sequence_ids(tokenizer, prompt, response)[:config.max_length]
            reply = [{"role": "assistant", "content": response}]
            return sequence_ids(tokenizer, prompt_messages(prompt), reply)[:config.max_length]

        sequences = [ids(prompt, response) for prompt, response in examples]
        return [f"{score:.4f}" for score in score_sequences(model, tokenizer, sequences, config.eval_batch_size)]

    def input_fields(self, record: RunRecord) -> list[str]:
        return ["prompt", "response"]


def sequence_ids(tokenizer: Any, prompt: Any, reply: Any) -> list[int]:
    """The token ids TRL's RewardTrainer makes of a prompt and one reply: a conversation
    rendered by the chat template, or the texts joined with the end-of-text token after the
    reply (none for a tokenizer without one, such as BERT's, which ends with [SEP])."""
    if isinstance(prompt, str):
        end = tokenizer.eos_token or ""
        return tokenizer(prompt + reply + ("" if reply.endswith(end) else end))["input_ids"]
    return tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]


def reward_trainer(model: nn.Module, config: RunConfig, tokenizer: Any, scratch_dir: str, train: Any, evaluation: Any,
                   **kwargs: Any) -> Any:
    """TRL's RewardTrainer on tokenized pairs, with peftkit's timing, scoring evaluation by
    `pair_metrics` over every pair (`eval_accuracy` is what selects the best epoch)."""
    from trl import RewardConfig, RewardTrainer

    from peftkit.models import keep_trainable_fp32
    from peftkit.trainer import Timed, training_arguments

    class TimedRewardTrainer(Timed, RewardTrainer):
        def __init__(self, model: nn.Module, **kwargs: Any):
            """TRL casts a 4-bit model's trainable weights to bf16, which a plain head cannot
            multiply with fp32 inputs: they train in fp32, as everywhere in peftkit."""
            super().__init__(model, **kwargs)
            keep_trainable_fp32(self.model)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """TRL adds its own evaluation accuracy and margin, means of each batch's means
            (a short last batch counts as much as a full one): peftkit's, over the pairs, stay."""
            if "eval_accuracy" in logs:
                for name in ("accuracy", "margin"):
                    self._metrics["eval"].pop(name, None)
            super().log(logs, start_time)

    args = training_arguments(config, scratch_dir, args_class=RewardConfig, label_names=(), max_length=None,
                              disable_dropout=False, center_rewards_coefficient=config.center_rewards_coefficient)
    return TimedRewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                              processing_class=tokenizer, data_collator=PadPairs(tokenizer),
                              compute_metrics=score_pairs, preprocess_logits_for_metrics=pair_columns, **kwargs)


class PadPairs:
    """A batch of pairs as TRL's RewardTrainer reads it (every chosen sequence, then every
    rejected one), padded on the tokenizer's side: prompt learning pads a decoder on the left,
    since given embeddings its head reads the last position (peftkit.strategies.peft_methods)."""

    def __init__(self, tokenizer: Any):
        self.pad_id, self.side = tokenizer.pad_token_id, tokenizer.padding_side

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([example[f"{side}_ids"] for side in SIDES for example in examples])

    def pad(self, sequences: list[list[int]]) -> dict[str, Any]:
        """Token sequences as one padded batch of `input_ids` and `attention_mask`."""
        import torch
        from trl.trainer.utils import pad

        rows = [torch.tensor(ids, dtype=torch.long) for ids in sequences]
        return {"input_ids": pad(rows, self.pad_id, padding_side=self.side),
                "attention_mask": pad([torch.ones_like(row) for row in rows], 0, padding_side=self.side)}


def pair_columns(logits: Any, labels: Any) -> Any:
    """One batch's scores as (chosen, rejected) rows, one per pair (the collator's layout)."""
    return logits.reshape(2, -1).T


def score_pairs(prediction: Any) -> dict[str, float]:
    """`pair_metrics` of an evaluation's gathered (chosen, rejected) scores. Its `loss` is the
    one recorded: Trainer prefixes these keys after setting its own `eval_loss` (a mean of the
    batches' losses), which this one then replaces."""
    scores = np.asarray(prediction.predictions, dtype=np.float64)
    return pair_metrics(scores[:, 0], scores[:, 1])


def pair_metrics(chosen: Any, rejected: Any) -> dict[str, float]:
    """Over every pair: the share whose chosen reply scores strictly higher (a tie does not),
    the mean margin chosen - rejected, and the mean loss -log sigmoid(margin)."""
    margins = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    accuracy, margin = margin_summary(margins.tolist())
    return {"accuracy": accuracy, "margin": margin, "loss": float(np.logaddexp(0.0, -margins).mean())}


def score_sequences(model: nn.Module, tokenizer: Any, sequences: list[list[int]], batch_size: int) -> list[float]:
    """The model's score of each token sequence, in batches of `batch_size` padded as in training."""
    import torch

    collate = PadPairs(tokenizer)
    scores: list[float] = []
    model.eval()
    for first in range(0, len(sequences), batch_size):
        batch = collate.pad(sequences[first: first + batch_size])
        inputs = {name: tensor.to(model.device) for name, tensor in batch.items()}
        with torch.no_grad():
            scores += model(**inputs).logits[:, 0].float().tolist()
    return scores
