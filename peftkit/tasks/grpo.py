"""RL with verifiable rewards: GRPO (TRL's GRPOTrainer) on prompts whose answer can be checked.

Data: any format `sft` reads (chat messages, ShareGPT, Alpaca, prompt and completion); the
conversation up to the assistant's turn is the prompt, and the assistant's answer the
reference (`answer`; `references` where the data has several). Built-in: `sst2-rl` (sst2-chat's
sentiment questions) and `gsm8k-rl` (GSM8K, rewarded on the number after `####`).

Training: for each prompt TRL samples `num_generations` replies (at `temperature`, at most
`max_completion_length` tokens), scores each with the rewards (`peftkit.rewards`: the answer
checks below, `format`, your own functions; the total is their weighted sum) and moves the
policy toward the replies that scored above their group's mean. `batch_size` counts replies,
as TRL's does: a batch holds `batch_size / num_generations` prompts, all of whose replies are
generated at once, so a step's memory does not grow with gradient accumulation. `beta` > 0
keeps the policy near its start (with a PEFT adapter, TRL's frozen copy of it; else a second
model). Evaluation: greedy replies to the split's prompts, scored by every reward
(`reward_<name>`, and their weighted total `reward`, which picks the checkpoint on the
selection slice at each epoch) and by exact match as `sft` scores it; the replies are saved as
predictions.jsonl.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING, Any, Callable

from peftkit.errors import PeftkitError
from peftkit.memory.generation import kv_cache_bytes
from peftkit.memory.heads import fused_lm_head_bytes
from peftkit.options import GrpoOptions
from peftkit.rewards import Reward, RewardFunction, answer_reward, resolve_rewards, score
from peftkit.text_metrics import normalize_answer
from peftkit.tasks.base import (DATASETS, BuiltinDataset, Evaluation, Prepared, TaskData, generation_summary,
                                register_task, resolve_task, rows_to_generate)
from peftkit.tasks.sft import (InstructionTuning, encode_prompts, generate, gsm8k_answer, largest_generation_batch,
                               score_generations, set_chat_template)

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig

DATASETS["sst2-rl"] = BuiltinDataset("grpo", {"messages_column": "messages"}, directory="sst2-chat")
DATASETS["gsm8k-rl"] = BuiltinDataset("grpo", {"prompt_column": "prompt", "completion_column": "completion"},
                                      hub=("openai/gsm8k", "main"), hub_columns={"question": "prompt", "answer": "completion"},
                                      answer_format="gsm8k", directory="gsm8k")


def number(text: str) -> float | None:
    """The final number of a GSM8K-style answer as a number (None: it has none), so that 72,
    72.0 and 72.00 are one answer."""
    found = gsm8k_answer(text)
    try:
        return float(found) if found else None
    except ValueError:
        return None


# the task's own answer checks, beside `format` and user functions (peftkit.rewards)
ANSWER_REWARDS: dict[str, RewardFunction] = {"exact": answer_reward("exact", normalize_answer),
                                             "gsm8k": answer_reward("gsm8k", number)}


@register_task("grpo")
class Grpo(InstructionTuning):
    description = "prompts with checkable answers -> replies trained on verifiable rewards (GRPO, causal LM)"
    metrics = ("reward", "exact_match")
    selects = "reward"
    primary = "reward"
    table_metrics = ("reward", "exact_match")
    options = GrpoOptions

    def check_config(self, config: RunConfig, strategy: Any) -> None:
        """The rewards resolve (imported now, before any weights load), and every batch holds
        whole groups of one prompt's replies."""
        run_rewards(config)
        if config.batch_size % config.num_generations:
            raise PeftkitError(f"batch_size {config.batch_size} is not a multiple of num_generations "
                               f"{config.num_generations}: a batch holds whole groups of one prompt's replies; set "
                               f"--batch-size {_multiple(config.batch_size, config.num_generations)}")
        if config.max_completion_length >= config.max_length:
            raise PeftkitError(f"max_completion_length {config.max_completion_length} leaves no room for a prompt in "
                               f"max_length {config.max_length}: raise --max-length or lower max_completion_length")

    def output_memory(self, config: Any, batch_size: int, seq_len: int, eval_batch_size: int, eval_seq_len: int,
                      bytes_per_value: int, device: str, max_new_tokens: int, answer_tokens: int | None = None,
                      eval_answer_tokens: int | None = None, num_beams: int = 1,
                      generation_batch: tuple[int, int] = (1, 1)) -> dict[str, int]:
        """Training generates a batch's replies at once (batch_size / num_generations prompts,
        num_generations replies each), keeping every layer's keys and values for the prompt and
        up to `max_new_tokens` (the larger of max_completion_length and max_new_tokens); the
        loss projects only the replies' positions (`answer_tokens`) through the fused LM head.
        Greedy evaluation generates `generation_batch` (the larger of it and a training batch
        counts) and scores no loss."""
        rows, prompt = generation_batch
        scored = batch_size * min(seq_len, answer_tokens or seq_len)
        return {"output_layer": fused_lm_head_bytes(config, scored, device, backward=True, bytes_per_value=bytes_per_value),
                "generation_cache": kv_cache_bytes(config, max(rows, batch_size), prompt + max_new_tokens,
                                                   bytes_per_value)}

    def estimate_options(self, config: RunConfig) -> dict[str, Any]:
        """The longer of a sampled reply and a greedy one, and the reply tokens the loss scores."""
        return {"max_new_tokens": max(config.max_new_tokens, config.max_completion_length), "num_beams": 1,
                "max_target_length": config.max_completion_length, "packing": False}

    def longest_answers(self, prepared: Prepared, config: RunConfig) -> dict[str, int]:
        """None measured: the replies are sampled while training (max_completion_length bounds them)."""
        return {}

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Each split as TRL's GRPOTrainer reads it: the chat `prompt` (the conversation before
        the assistant's answer), the reference `answer` and `references`, and `length`, the most
        tokens a row can reach (its prompt, then a sampled reply while training or a greedy one
        when evaluated). Training prompts that leave no room for a reply within max_length are
        dropped (`dropped_train_examples`)."""
        set_chat_template(tokenizer, config.chat_template)
        _without_token_types(tokenizer)
        splits = {}
        for name, split in data.splits().items():
            budget = config.max_completion_length if name == "train" else config.max_new_tokens
            prompts = encode_prompts(tokenizer, [row["messages"][:-1] for row in split])
            splits[name] = split.map(lambda row, i: {"prompt": row["messages"][:-1],
                                                     "answer": row["messages"][-1]["content"],
                                                     "length": len(prompts[i]) + budget},
                                     with_indices=True, remove_columns=["messages"])
        before, limit = len(splits["train"]), config.max_length
        splits["train"] = splits["train"].filter(lambda row: row["length"] <= limit)
        if len(splits["train"]) == 0:
            raise PeftkitError(f"no training prompt leaves room for a reply of max_completion_length="
                               f"{config.max_completion_length} within max_length={config.max_length}: raise --max-length")
        new_tokens = self.estimate_options(config)["max_new_tokens"]
        evaluated = [encode_prompts(tokenizer, rows_to_generate(split, config)["prompt"])
                     for name, split in splits.items() if name in ("validation", "test")]
        info = {**data.info, "dropped_train_examples": before - len(splits["train"]),
                "generation_batch": _largest(largest_generation_batch(evaluated, config.eval_batch_size, new_tokens),
                                             {"rows": config.batch_size,
                                              "prompt_tokens": max(splits["train"]["length"]) - config.max_completion_length},
                                             new_tokens)}
        return Prepared(splits, data.splits(), info)

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        from peftkit.trainer import build_optimizer

        optimizer = build_optimizer(config.optimizer, strategy.param_groups(model, config.lr, config.weight_decay))
        rewards = run_rewards(config)
        selection = prepared.selection
        _give_end_of_text(tokenizer, model)

        def score_selection() -> dict[str, float]:
            return greedy_scores(model, tokenizer, selection, rewards, config, prepared.info["answer_format"])[0]

        return _grpo_trainer(model, config, tokenizer, scratch_dir, prepared.train, selection, rewards,
                             score_selection, optimizers=(optimizer, None), callbacks=callbacks,
                             use_vllm=_can_use_vllm(strategy))

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Greedy replies to the split's prompts (the first `max_generate_samples`), scored by
        every reward and by exact match, and kept."""
        chosen = rows_to_generate(prepared.splits[split], config)
        if len(chosen) == 0:
            return Evaluation({})
        rewards = run_rewards(config)
        metrics, replies, totals = greedy_scores(model, tokenizer, chosen, rewards, config,
                                                 prepared.info["answer_format"])
        predictions = [{"prompt": row["prompt"][-1]["content"], "reference": row["answer"],
                        "references": row["references"], "generated": reply.text, "finished": reply.finished,
                        "reward": total} for row, reply, total in zip(chosen, replies, totals)]
        return Evaluation(metrics, predictions, generation_summary(replies, config.max_new_tokens, split))


def run_rewards(config: RunConfig) -> list[Reward]:
    """The run's rewards, resolved (`peftkit.rewards`); by default the answer check its data's
    answers call for (gsm8k for GSM8K-style answers, else exact)."""
    dataset = resolve_task(config.task_name)[1]
    default = "gsm8k" if dataset is not None and dataset.answer_format == "gsm8k" else "exact"
    return resolve_rewards(config.rewards or [default], config.format_pattern, ANSWER_REWARDS)


def greedy_scores(model: nn.Module, tokenizer: Any, rows: Any, rewards: list[Reward], config: RunConfig,
                  answer_format: str) -> tuple[dict[str, float], list[Any], list[float]]:
    """Greedy replies to `rows` (prompt, answer, references), their mean total `reward`, each
    reward's mean (`reward_<name>`, NaN replies left out) and exact match; the replies and each
    one's total reward."""
    replies = generate(model, tokenizer, rows["prompt"], config.max_new_tokens, config.eval_batch_size)
    texts = [reply.text for reply in replies]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    each, totals = score(rewards, rows["prompt"], completions,
                         {"answer": rows["answer"], "references": rows["references"]})
    metrics = {"reward": sum(totals) / len(totals)}
    for name, values in each.items():
        kept = [v for v in values if not math.isnan(v)]
        metrics[f"reward_{name}"] = sum(kept) / len(kept) if kept else math.nan
    metrics["exact_match"] = score_generations(texts, rows["references"], answer_format)["exact_match"]
    return metrics, replies, totals


def _grpo_trainer(model: nn.Module, config: RunConfig, tokenizer: Any, scratch_dir: str, train: Any, selection: Any,
                  rewards: list[Reward], score_selection: Callable[[], dict[str, float]], use_vllm: bool,
                  **kwargs: Any) -> Any:
    """TRL's GRPOTrainer with peftkit's timing, whose evaluation is `score_selection` (greedy
    replies to the selection slice, scored by the rewards), so that the best epoch is picked
    by reward."""
    from trl import GRPOConfig, GRPOTrainer

    from peftkit.trainer import Timed, autocast_for, training_arguments

    class GreedyEvaluation(GRPOTrainer):
        def train(self, *args: Any, **kwargs: Any) -> Any:
            """Train, then drop TRL's frozen copy of the adapter it keeps as the reference (beta > 0
            with a PEFT model), so that the run saves and reloads the trained adapter alone."""
            try:
                return super().train(*args, **kwargs)
            finally:
                if "ref" in getattr(self.model, "peft_config", {}):
                    self.model.delete_adapter("ref")

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                     metric_key_prefix: str = "eval") -> dict[str, float]:
            training = self.model.training
            with autocast_for(config):
                metrics = {f"{metric_key_prefix}_{k}": v for k, v in score_selection().items()}
            self.model.train(training)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    class TimedGRPOTrainer(Timed, GreedyEvaluation):
        pass

    vllm = {"use_vllm": True, "vllm_mode": "colocate"} if use_vllm else {}
    # one generation per batch (steps_per_generation 1): gradient accumulation adds prompts, not memory;
    # evaluation is greedy, one reply per prompt (num_generations_eval 1), in GreedyEvaluation
    args = training_arguments(config, scratch_dir, group_by_length=False, args_class=GRPOConfig,
                              num_generations=config.num_generations, num_generations_eval=1, steps_per_generation=1,
                              max_completion_length=config.max_completion_length, temperature=config.temperature,
                              beta=config.beta, reward_weights=[r.weight for r in rewards], **vllm)
    return TimedGRPOTrainer(model=model, reward_funcs=[r.function for r in rewards], args=args, train_dataset=train,
                            eval_dataset=selection, processing_class=tokenizer, **kwargs)


def _can_use_vllm(strategy: Any) -> bool:
    """Generate with vLLM (colocated) where it is installed and a GPU runs, for a model TRL can
    hand vLLM the weights of (a PEFT adapter, merged, or the whole model)."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() and \
        strategy.saves in ("peft", "whole-model")


def _without_token_types(tokenizer: Any) -> None:
    """Make the tokenizer leave out token type ids: a causal LM reads none, and TRL passes what
    the tokenizer returns to `generate`, which refuses them (a BERT-style tokenizer, as
    tiny-llama's, makes them)."""
    tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]


def _give_end_of_text(tokenizer: Any, model: nn.Module) -> None:
    """Give a tokenizer without an end-of-text token the model's own: TRL ends each sampled
    reply at the tokenizer's and the model's, and cannot take a missing one (a BERT-style
    tokenizer, as tiny-llama's, has none)."""
    ends = model.generation_config.eos_token_id
    end = ends[0] if isinstance(ends, list) and ends else ends
    if tokenizer.eos_token is None and isinstance(end, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)


def _multiple(batch_size: int, groups: int) -> int:
    """The nearest multiple of `groups` at or above `batch_size`."""
    return -(-batch_size // groups) * groups


def _largest(evaluated: dict[str, int], training: dict[str, int], new_tokens: int) -> dict[str, int]:
    """Of two generation batches (rows, prompt tokens), the one whose key/value cache is larger."""
    return max(evaluated, training, key=lambda batch: batch["rows"] * (batch["prompt_tokens"] + new_tokens))
