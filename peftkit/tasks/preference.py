"""Preference tuning of a causal LM with TRL's own trainers: `dpo` (DPOTrainer, any of its
losses), `kto` (KTOTrainer; pairs split into a desirable and an undesirable reply), `orpo`
(ORPOTrainer) and `simpo` (CPOTrainer with the SimPO loss). One mechanism, one registration
per method: a method names its TRL trainer and config, whether it keeps a reference model, and
how its options become TRL's settings.

The reference: with a PEFT strategy, the base with the adapter disabled (TRL's own handling:
no second copy in memory); with any other strategy (full, partial, peftkit's adapters), the
frozen copy TRL loads from the model's checkpoint, which the estimate counts
(`reference_bytes`). `init_from` makes an earlier run's model the base, hence the reference.

Evaluation, comparable across every row, the untuned model's included: the share of pairs
whose chosen reply the model itself prefers by mean per-token log-likelihood
(`likelihood_accuracy`, and the mean difference, `likelihood_margin`); for methods with a
reference, the implicit reward beta x (log p - log p_ref) summed over the reply, as TRL's
DPO logs it (`reward_accuracy`, `reward_margin`), against reference log-probabilities computed
before training; for data with checkable answers, greedy replies scored by exact match (as
sft scores them) and saved as predictions.jsonl.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from peftkit.data import BuiltinDataset, TaskData
from peftkit.errors import PeftkitError
from peftkit.memory.generation import kv_cache_bytes
from peftkit.memory.heads import fused_lm_head_bytes
from peftkit.options import DpoOptions, KtoOptions, OrpoOptions, SimpoOptions
from peftkit.tasks.base import (Evaluation, Prepared, Reply, Task, generation_summary, register_task,
                                rows_to_generate)
from peftkit.tasks.pairs import load_pairs, margin_summary, prompt_messages, reply_text, tokenize_pair
from peftkit.tasks.sft import encode_prompts, generate, largest_generation_batch, score_generations, set_chat_template

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig

LOGITS_BUDGET = 2**28  # bytes of fp32 logits (and their log-softmax) one scoring batch may hold
TRL_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass(frozen=True)
class Method:
    """A preference method: where TRL keeps its trainer and config, its default beta, whether
    it holds the policy to a reference model, and whether its collator needs the data reduced
    to the columns it tokenized."""

    module: str
    trainer: str
    config: str
    default_beta: float
    reference: bool
    pads_every_column: bool = False  # its collator pads whatever columns the data has (TRL's experimental ones)

    def classes(self) -> tuple[type, type]:
        """TRL's trainer and config classes; one line if the installed TRL lacks them."""
        try:
            module = importlib.import_module(self.module)
            return getattr(module, self.trainer), getattr(module, self.config)
        except (ImportError, AttributeError):
            import trl

            raise PeftkitError(f"the installed TRL ({trl.__version__}) has no {self.module}.{self.trainer}: install "
                               "a TRL that does (pip install -U trl)") from None


class PreferenceTuning(Task):
    """What every preference method shares: pairs in, a causal LM out, the same evaluation."""

    model_class = "AutoModelForCausalLM"
    model_suffix = "ForCausalLM"
    peft_task_type = "CAUSAL_LM"
    metrics = ("likelihood_accuracy", "likelihood_margin", "reward_accuracy", "reward_margin", "exact_match")
    selects = "likelihood_accuracy"
    primary = "likelihood_accuracy"
    table_metrics = ("likelihood_accuracy", "reward_accuracy", "exact_match")
    pretrained_head = True
    generates_text = True
    predicts = False  # its runs answer chat prompts: `peftkit generate`
    reads = "pairs"
    rows_per_example = 2  # the chosen and the rejected sequence of a pair, in one batch
    default_max_length = 1024
    prediction_fields = ("prompt", "references", "generated")
    method: ClassVar[Method]

    def beta(self, config: RunConfig) -> float:
        """The run's beta, else the method's own default (TRL's)."""
        return config.beta or self.method.default_beta

    def trl_settings(self, config: RunConfig) -> dict[str, Any]:
        """The method's own TRL config fields, from the run's options."""
        return {"beta": self.beta(config), **({"remove_unused_columns": True} if self.method.pads_every_column else {})}

    def keeps_reference(self, strategy: Any) -> bool:
        """Whether training holds a second, frozen copy of the model (a reference the adapter
        cannot stand in for)."""
        return self.method.reference and strategy.saves != "peft"

    def check_config(self, config: RunConfig, strategy: Any) -> None:
        self.method.classes()  # the installed TRL has the trainer, or one line now

    def estimate_options(self, config: RunConfig) -> dict[str, Any]:
        return {**super().estimate_options(config), "max_new_tokens": config.max_new_tokens}

    def output_memory(self, config: Any, batch_size: int, seq_len: int, eval_batch_size: int, eval_seq_len: int,
                      bytes_per_value: int, device: str, max_new_tokens: int, answer_tokens: int | None = None,
                      eval_answer_tokens: int | None = None, num_beams: int = 1,
                      generation_batch: tuple[int, int] = (1, 1)) -> dict[str, int]:
        """TRL's fused LM head over both replies' positions of every pair in the batch (the
        batch sizes given here already count both rows), the logits of one batch of peftkit's
        own scoring (at most `LOGITS_BUDGET`), and the greedy replies' key/value cache."""
        rows, prompt = generation_batch
        return {"output_layer": fused_lm_head_bytes(config, batch_size * seq_len, device, backward=True,
                                                    bytes_per_value=bytes_per_value),
                "evaluation_output": min(LOGITS_BUDGET, 8 * eval_batch_size * eval_seq_len * config.vocab_size),
                "generation_cache": kv_cache_bytes(config, rows, prompt + max_new_tokens, bytes_per_value)}

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        return load_pairs(config, dataset)

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        from peftkit.models import load_causal_lm

        return load_causal_lm(source, tokenizer, quantization, **weights)

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Each pair's token ids as TRL's trainer will make them (`length`: the longer
        sequence, prompt included), before any weights load; the raw pairs are what TRL is given."""
        if data.info["data_format"] == "conversational":
            set_chat_template(tokenizer, config.chat_template)

        def encode(pair: dict[str, Any]) -> dict[str, Any]:
            ids = tokenize_pair(tokenizer, pair)
            longest = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
            return {**ids, "length": min(longest, config.max_length)}

        splits = {name: split.map(encode) for name, split in data.splits().items()}
        generated = [prompt_messages(row["prompt"]) for row in rows_to_generate(data.validation, config)]
        info = {**data.info, "generation_batch": largest_generation_batch([encode_prompts(tokenizer, generated)],
                                                                          config.eval_batch_size,
                                                                          config.max_new_tokens)}
        return Prepared(splits, data.splits(), info)

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        """TRL's trainer for the method, evaluating the selection slice by peftkit's metrics;
        the reference's log-probabilities of every evaluated split are taken first, while the
        model is still the reference (or with the adapter disabled)."""
        from peftkit.trainer import Timed, build_optimizer, training_arguments

        if self.method.reference:
            for name, split in prepared.splits.items():
                if name != "train":
                    prepared.scratch[f"reference:{name}"] = reply_logps(model, split, config.eval_batch_size,
                                                                        reference=True)
        trainer_class, config_class = self.method.classes()
        task = self

        class TimedPreferenceTrainer(Timed, trainer_class):
            def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
                output = super().evaluation_loop(*args, **kwargs)
                prefix = kwargs.get("metric_key_prefix", "eval")
                scores = task.pair_metrics(self.model, config, prepared, "selection")
                output.metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
                return output

        optimizer = build_optimizer(config.optimizer, strategy.param_groups(model, config.lr, config.weight_decay))
        args = training_arguments(config, scratch_dir, group_by_length=False, args_class=config_class,
                                  max_length=config.max_length, **self.trl_settings(config))
        raw = {name: split.select_columns(["prompt", "chosen", "rejected"]) for name, split in prepared.raw.items()}
        return TimedPreferenceTrainer(model=model, args=args, train_dataset=self.trl_data(raw["train"]),
                                      eval_dataset=self.trl_data(raw["selection"]) if "selection" in raw else None,
                                      processing_class=tokenizer, optimizers=(optimizer, None), callbacks=callbacks)

    def trl_data(self, pairs: Any) -> Any:
        """The data as the method's TRL trainer reads it (pairs, for all but KTO)."""
        return pairs

    def pair_metrics(self, model: nn.Module, config: RunConfig, prepared: Prepared, split: str) -> dict[str, float]:
        """Likelihood preference accuracy and margin of one split's pairs, and for methods with
        a reference the implicit reward's accuracy and margin."""
        logps = reply_logps(model, prepared.splits[split], config.eval_batch_size)
        metrics = likelihood_preference(logps)
        if self.method.reference:
            reference = prepared.scratch.get(f"reference:{split}", logps)  # untrained: the model is the reference
            metrics |= implicit_rewards(logps, reference, self.beta(config))
        return metrics

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Every pair of the split scored once; where its answers are checkable, greedy
        replies to its prompts (the first `max_generate_samples`) scored by exact match."""
        metrics = self.pair_metrics(model, config, prepared, split)
        chosen = rows_to_generate(prepared.raw[split], config)
        if prepared.info.get("answer_format") == "open" or len(chosen) == 0:
            return Evaluation(metrics)
        conversations = [prompt_messages(row["prompt"]) for row in chosen]
        references = [[reply_text(row["chosen"])] for row in chosen]
        replies = generate(model, tokenizer, conversations, config.max_new_tokens, config.eval_batch_size)
        metrics["exact_match"] = score_generations([r.text for r in replies], references)["exact_match"]
        predictions = [{"prompt": c[-1]["content"], "references": r, "generated": g.text, "finished": g.finished}
                       for c, r, g in zip(conversations, references, replies)]
        return Evaluation(metrics, predictions, generation_summary(replies, config.max_new_tokens, split))

    def answer(self, model: nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
               batch_size: int) -> list[Reply]:
        return generate(model, tokenizer, conversations, max_new_tokens, batch_size)


def reply_logps(model: nn.Module, pairs: Any, batch_size: int, reference: bool = False) -> dict[str, list[float]]:
    """Summed log-probabilities and token counts of each pair's chosen and rejected reply given
    its prompt (`prompt_ids`, `chosen_ids`, `rejected_ids`), in batches of at most `batch_size`
    sequences whose logits fit `LOGITS_BUDGET`; `reference`: a PEFT model's adapter disabled
    (the base it started from)."""
    import torch

    sums: dict[str, list[float]] = {key: [0.0] * len(pairs) for key in
                                    ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    sequences = [(row["prompt_ids"], row[f"{side}_ids"], side, index) for index, row in enumerate(pairs)
                 for side in ("chosen", "rejected")]
    was_training = model.training
    model.eval()
    off = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else nullcontext()
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad(), off:
        for chunk in _scoring_batches(sequences, batch_size, vocab):
            width = max(len(p) + len(r) for p, r, _, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, (prompt, reply, _, _) in enumerate(chunk):
                ids[i, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
                mask[i, :len(prompt) + len(reply)] = 1
                scored[i, len(prompt):len(prompt) + len(reply)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logits = logits[:, -width:]  # prompt learning prepends virtual tokens
            token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            token_logps = token_logps.cpu() * scored[:, 1:]
            for i, (_, _, side, index) in enumerate(chunk):
                sums[side][index] = float(token_logps[i].sum())
                sums[f"{side}_tokens"][index] = int(scored[i, 1:].sum())
    model.train(was_training)
    return sums


def _scoring_batches(sequences: list[tuple], batch_size: int, vocab: int) -> list[list[tuple]]:
    """Sequences sorted by length, in batches of at most `batch_size` whose fp32 logits and
    log-softmax (8 bytes per position and vocabulary entry) fit `LOGITS_BUDGET`."""
    order = sorted(sequences, key=lambda s: len(s[0]) + len(s[1]))
    batches: list[list[tuple]] = []
    for item in order:
        width = len(item[0]) + len(item[1])
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * width * vocab * 8 <= LOGITS_BUDGET:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def likelihood_preference(logps: dict[str, list[float]]) -> dict[str, float]:
    """The share of pairs whose chosen reply has the higher mean per-token log-likelihood,
    and the mean difference (a tie counts as not preferred)."""
    def mean(side: str, i: int) -> float:
        return logps[side][i] / max(logps[f"{side}_tokens"][i], 1)

    share, mean_difference = margin_summary([mean("chosen", i) - mean("rejected", i) for i in range(len(logps["chosen"]))])
    return {"likelihood_accuracy": share, "likelihood_margin": mean_difference}


def implicit_rewards(logps: dict[str, list[float]], reference: dict[str, list[float]], beta: float) -> dict[str, float]:
    """DPO's implicit reward of each reply, beta x (log p - log p_ref) over its tokens: the share
    of pairs where the chosen reply's is higher (`reward_accuracy`, as TRL's
    rewards/accuracies) and the mean difference (`reward_margin`, TRL's rewards/margins)."""
    share, mean_margin = margin_summary([beta * ((c - rc) - (r - rr)) for c, r, rc, rr in
                                         zip(logps["chosen"], logps["rejected"], reference["chosen"],
                                             reference["rejected"])])
    return {"reward_accuracy": share, "reward_margin": mean_margin}


@register_task("dpo")
class DirectPreference(PreferenceTuning):
    description = "preference pairs -> DPO (TRL's losses: sigmoid, ipo, hinge, ...; sft mixes in RPO's NLL)"
    options = DpoOptions
    method = Method("trl", "DPOTrainer", "DPOConfig", default_beta=0.1, reference=True)

    def check_config(self, config: RunConfig, strategy: Any) -> None:
        super().check_config(config, strategy)
        unknown = [loss for loss in config.loss_type if loss not in TRL_DPO_LOSSES]
        if unknown:
            raise PeftkitError(f"loss_type {unknown[0]} is not one of TRL's DPO losses: {', '.join(TRL_DPO_LOSSES)}")
        if config.loss_weights is not None and len(config.loss_weights) != len(config.loss_type):
            raise PeftkitError(f"loss_weights has {len(config.loss_weights)} weights for {len(config.loss_type)} "
                               "loss_type entries: give one weight per loss")

    def trl_settings(self, config: RunConfig) -> dict[str, Any]:
        return {**super().trl_settings(config), "loss_type": config.loss_type, "loss_weights": config.loss_weights,
                "label_smoothing": config.label_smoothing}


@register_task("kto")
class KahnemanTversky(PreferenceTuning):
    description = "preference pairs -> KTO (each reply desirable or not)"
    options = KtoOptions
    method = Method("trl", "KTOTrainer", "KTOConfig", default_beta=0.1, reference=True)

    def trl_settings(self, config: RunConfig) -> dict[str, Any]:
        return {**super().trl_settings(config), "desirable_weight": config.desirable_weight,
                "undesirable_weight": config.undesirable_weight,
                "train_sampling_strategy": "sequential"}  # TRL pairs each reply with its neighbour's for the KL term

    def trl_data(self, pairs: Any) -> Any:
        """Each pair as two unpaired examples: the chosen reply desirable, the rejected not."""
        from trl.data_utils import unpair_preference_dataset

        return unpair_preference_dataset(pairs)


@register_task("orpo")
class OddsRatioPreference(PreferenceTuning):
    description = "preference pairs -> ORPO (SFT loss + odds ratio, no reference model)"
    options = OrpoOptions
    method = Method("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig", default_beta=0.1, reference=False,
                    pads_every_column=True)


@register_task("simpo")
class SimplePreference(PreferenceTuning):
    description = "preference pairs -> SimPO (length-normalized rewards, no reference model)"
    options = SimpoOptions
    method = Method("trl.experimental.cpo", "CPOTrainer", "CPOConfig", default_beta=2.0, reference=False,
                    pads_every_column=True)

    def trl_settings(self, config: RunConfig) -> dict[str, Any]:
        return {**super().trl_settings(config), "loss_type": "simpo", "simpo_gamma": config.simpo_gamma,
                "cpo_alpha": config.cpo_alpha}

