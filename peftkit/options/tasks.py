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


class SftOptions(GenerationOptions, ReferencesOptions):
    """Instruction tuning of a causal LM: the conversation's columns, its template, packing."""

    messages_column: str | None = Field(None, description="The column of chat messages, a list of {role, content} "
                                                          "(default: detected from the columns).")
    prompt_column: str | None = Field(None, description="The prompt column, when the data is prompt and completion "
                                                        "(default: detected).")
    completion_column: str | None = Field(None, description="The completion column that goes with prompt_column.")
    chat_template: str | None = Field(None, description="A Jinja chat template, as a file or as text (default: the "
                                                        "model's own).")
    prompt_template: str | None = Field(None, description="The user turn made of the prompt column, {prompt} "
                                                          "marking where it goes.")
    packing: bool = Field(False, description="Pack examples into rows of max_length, never attending across them.")


class Seq2SeqOptions(GenerationOptions, ReferencesOptions):
    """Encoder-decoder generation (summarization): the source and target and how targets are generated."""

    source_column: str | None = Field(None, description="The source text column (default: source).")
    target_column: str | None = Field(None, description="The target text column (default: target).")
    source_prefix: str | None = Field(None, description="Text put before every source, e.g. 'summarize: ' for T5.")
    max_target_length: int | None = Field(None, ge=1, description="Target tokens kept (default: 128).")
    num_beams: int | None = Field(None, ge=1, description="Beams per example in generation (default: 1, greedy).")
