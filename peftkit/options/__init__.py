"""The option schemas: pydantic models of what a run can be told, torch-free and importing no
implementation, each field with the description that `--help`, errors and the docs show.

- `common`: the options of every run (`CommonOptions`, and `StrategySpec` for the strategy's
  name and options; a strategy's own options are its dataclass fields, `peftkit.strategies`);
- `tasks`: one group per task kind (`ClassificationOptions`, `SftOptions`, ...);
- `run`: `RunConfig`, the common options composed with the run's task group.
"""

from __future__ import annotations

from peftkit.options.common import CommonOptions, StrategySpec
from peftkit.options.run import RunConfig, config_class
from peftkit.options.tasks import (ChatTemplateOptions, ClassificationOptions, ConversationOptions, DpoOptions,
                                   GenerationOptions, GrpoOptions, InitFromOptions, KtoOptions, OrpoOptions,
                                   PairedOptions, PreferenceOptions, QAOptions, ReferencesOptions, RewardOptions,
                                   Seq2SeqOptions, SftOptions, SimpoOptions, TaskOptions, TokenClassificationOptions)

__all__ = ["ChatTemplateOptions", "ClassificationOptions", "CommonOptions", "ConversationOptions", "DpoOptions",
           "GenerationOptions", "GrpoOptions", "InitFromOptions", "KtoOptions", "OrpoOptions", "PairedOptions",
           "PreferenceOptions", "QAOptions", "ReferencesOptions", "RewardOptions", "RunConfig", "Seq2SeqOptions",
           "SftOptions", "SimpoOptions", "StrategySpec", "TaskOptions", "TokenClassificationOptions", "config_class"]
