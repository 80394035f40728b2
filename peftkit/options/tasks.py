"""Each task kind's own options, as TRL gives each trainer its own config: which columns it
reads and how it generates. A task names its group (`Task.options`); a run's config is the
common options, its task's group and its strategy's options, and a key belongs to exactly one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TaskOptions(BaseModel):
    """Base of every task's option group (a task kind without options of its own uses it)."""

    model_config = ConfigDict(extra="forbid")


class ClassificationOptions(TaskOptions):
    """Sequence classification: which columns hold the text and the label."""

    text_columns: list[str] | None = Field(None, description="The text column, or two for a sentence pair (default: "
                                                             "the data set's, or the one text column there is).",
                                           json_schema_extra={"flags": ["--text-column"]})
    label_column: str | None = Field(None, description="The label column, strings or integers (default: label).")

    @field_validator("text_columns")
    @classmethod
    def _one_or_two(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not 1 <= len(value) <= 2:
            raise ValueError("text_columns takes one column (single text) or two (a sentence pair)")
        return value


class TokenClassificationOptions(TaskOptions):
    """Token classification (NER): the words and one tag per word."""

    tokens_column: str | None = Field(None, description="The column of words, a list per example (default: tokens).")
    tags_column: str | None = Field(None, description="The column of tags, one per word, strings or integers "
                                                      "(default: ner_tags).")
    tag_names: list[str] | None = Field(None, description="The names of integer tags, in order (default: the data's "
                                                          "own).")


class QAOptions(TaskOptions):
    """Extractive question answering: the columns of a SQuAD-like data set and its windows."""

    question_column: str | None = Field(None, description="The question column (default: question).")
    context_column: str | None = Field(None, description="The context column (default: context).")
    answers_column: str | None = Field(None, description="The answers column, SQuAD's {text: [...], answer_start: "
                                                         "[...]} (default: answers).")
    doc_stride: int | None = Field(None, ge=0, description="Tokens that neighbouring windows of a long context share "
                                                           "(default: a third of max_length).")


class GenerationOptions(TaskOptions):
    """Tasks that generate text: how much is generated when they are scored."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens generated at most per evaluated answer (greedy "
                                                      "unless num_beams).")
    max_generate_samples: int | None = Field(None, ge=0, description="How many validation examples are answered by "
                                                                     "generation and scored (default: all; 0: none).")


class ReferencesOptions(TaskOptions):
    """Tasks whose generations are scored against reference texts."""

    references_column: str | None = Field(None, description="A column holding a list of reference texts per "
                                                            "example to score generations against (default: the "
                                                            "example's own answer).")


class ChatTemplateOptions(TaskOptions):
    """Tasks that render chat messages for a causal LM."""

    chat_template: str | None = Field(None, description="A Jinja chat template, as a file or as text (default: the "
                                                        "model's own).")


class ConversationOptions(ChatTemplateOptions):
    """Conversations ending with the assistant's answer, in any of the formats `sft` reads."""

    messages_column: str | None = Field(None, description="The column of chat messages, a list of {role, content} "
                                                          "(default: detected from the columns).")
    prompt_column: str | None = Field(None, description="The prompt column, when the data is prompt and completion "
                                                        "(default: detected).")
    completion_column: str | None = Field(None, description="The completion column that goes with prompt_column.")
    prompt_template: str | None = Field(None, description="The user turn made of the prompt column, {prompt} "
                                                          "marking where it goes.")


class SftOptions(GenerationOptions, ReferencesOptions, ConversationOptions):
    """Instruction tuning of a causal LM: the conversation's columns, its template, packing."""

    packing: bool = Field(False, description="Pack examples into rows of max_length, never attending across them.")


class Seq2SeqOptions(GenerationOptions, ReferencesOptions):
    """Encoder-decoder generation (summarization): the source and target and how targets are generated."""

    source_column: str | None = Field(None, description="The source text column (default: source).")
    target_column: str | None = Field(None, description="The target text column (default: target).")
    source_prefix: str | None = Field(None, description="Text put before every source, e.g. 'summarize: ' for T5.")
    max_target_length: int | None = Field(None, ge=1, description="Target tokens kept (default: 128).")
    num_beams: int | None = Field(None, ge=1, description="Beams per example in generation (default: 1, greedy).")


class InitFromOptions(TaskOptions):
    """Tasks that can continue from an earlier run's model (SFT, then preference tuning or RL)."""

    init_from: str | None = Field(None, description="A finished peftkit run of the same model (e.g. an SFT adapter) "
                                                    "to start from; its model is also the reference.")


class PairedOptions(TaskOptions):
    """Data of preference pairs: a prompt, a chosen and a rejected reply."""

    prompt_column: str | None = Field(None, description="The prompt column: text, or chat messages ending with the "
                                                        "user's turn (default: prompt).")
    chosen_column: str | None = Field(None, description="The preferred reply: text, or one assistant message in a list "
                                                        "(default: chosen).")
    rejected_column: str | None = Field(None, description="The other reply, in the chosen column's form (default: "
                                                          "rejected).")


class PreferenceOptions(GenerationOptions, InitFromOptions, ChatTemplateOptions, PairedOptions):
    """Preference tuning of a causal LM (dpo, kto, orpo, simpo): the pairs, and how strongly
    the policy is held near its reference."""

    beta: float | None = Field(None, gt=0, description="Strength of the pull toward the reference (DPO, KTO) or of "
                                                       "the preference term (ORPO, SimPO) (default: the method's "
                                                       "own, as TRL sets it).")


class DpoOptions(PreferenceOptions):
    """Direct preference optimization: TRL's DPO losses, alone or mixed."""

    loss_type: list[str] = Field(["sigmoid"], description="DPO's loss, or several mixed by loss_weights: sigmoid, "
                                                          "hinge, ipo, robust, bco_pair, sppo_hard, nca_pair, aot, "
                                                          "apo_zero, apo_down, exo_pair, discopop, sigmoid_norm, sft "
                                                          "(the chosen reply's NLL: with sigmoid, RPO).")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type (default: 1 each).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: the assumed share of pairs whose "
                                                                  "preference is flipped.")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_several(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class KtoOptions(PreferenceOptions):
    """Kahneman-Tversky optimization: replies marked desirable or not, paired or unpaired."""

    completion_column: str | None = Field(None, description="Unpaired data: the reply column (default: completion; "
                                                            "paired data is split into one desirable and one "
                                                            "undesirable reply).")
    label_column: str | None = Field(None, description="Unpaired data: true where the reply is desirable (default: "
                                                       "label).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable replies' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable replies' loss.")


class OrpoOptions(PreferenceOptions):
    """Odds-ratio preference optimization: an SFT loss and an odds-ratio term, no reference model."""


class SimpoOptions(PreferenceOptions):
    """SimPO: length-normalized rewards with a target margin, no reference model (TRL's CPO trainer)."""

    simpo_gamma: float = Field(0.5, ge=0, description="The target reward margin between chosen and rejected.")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen reply (0: plain SimPO).")


class RewardOptions(ChatTemplateOptions, PairedOptions):
    """A reward model: one score per prompt and reply, trained on preference pairs."""

    center_rewards_coefficient: float | None = Field(None, ge=0, description="Weight of a term that keeps the scores "
                                                                             "centred on zero.")


class GrpoOptions(GenerationOptions, ReferencesOptions, InitFromOptions, ConversationOptions):
    """RL with verifiable rewards (GRPO): prompts whose answer is checkable (sft's data formats,
    the assistant's answer the reference), and the rewards that score sampled replies."""

    rewards: list[str] | None = Field(None, description="Reward functions, each NAME or NAME:WEIGHT: exact, gsm8k, "
                                                        "format, or your own as module:function or "
                                                        "path.py:function (default: gsm8k where the data's answers "
                                                        "end in '#### N', as gsm8k-rl's do, else exact).")
    format_pattern: str | None = Field(None, description="The regex a reply must match in full for the format "
                                                         "reward.")
    num_generations: int = Field(4, ge=2, description="Replies sampled per prompt, compared within their group.")
    max_completion_length: int = Field(16, ge=1, description="Tokens generated at most per sampled reply.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the training replies.")
    beta: float = Field(0.0, ge=0, description="KL pull toward the reference (0, TRL's default: no reference kept).")

    @field_validator("rewards", mode="before")
    @classmethod
    def _one_or_several(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value
