"""From option values to a checked run: names resolved against the task and strategy
registries, every combination checked, before any weight loads.

Recipes, CLI flags and the Python API all end here, so a typo'd key, a wrong type or an
impossible combination is caught in one place. The values are split into their groups: the
common options (`peftkit.options.common`), the task's own group (`Task.options`) and the
strategy's options (its dataclass fields); a key of no group is answered with the groups this
task does have and the closest key.
"""

from __future__ import annotations

from typing import Any

import pydantic

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.options import CommonOptions, GenerationOptions, RunConfig, StrategySpec, config_class
from peftkit.record import RunRecord
from peftkit.sources import declared_pooling
from peftkit.strategies import STRATEGIES, build_strategy
from peftkit.tasks import TASKS, Task, resolve_task, task_for_model


def make_config(values: dict[str, Any]) -> RunConfig:
    """Validate option values into the run's RunConfig, or raise one clear line."""
    task = _task_of(values)
    values = _own_keys(dict(values), task)
    strategy = _strategy_of(values)
    values["strategy"] = {"name": strategy.name, **strategy.options()}  # every default recorded
    try:
        config = config_class(task.options).model_validate(values)
    except pydantic.ValidationError as err:
        raise PeftkitError(explain(err, task)) from None
    config.resolved(task, build_strategy)
    strategy.check_quantization(config.quantization)
    task.check_strategy(strategy)
    if config.metric_for_best_model is None:
        config.metric_for_best_model = task.selects
    elif config.metric_for_best_model not in task.metrics:
        raise PeftkitError(f"metric_for_best_model '{config.metric_for_best_model}' is not a metric of task "
                           f"'{task.name}': choose one of {', '.join(task.metrics)}")
    if config.max_length is None:
        config.max_length = task.default_max_length
    check_pooling(config.pooling, task)
    if config.pooling == "auto":
        config.pooling = declared_pooling(config.model) if task.reads_one_vector else "model"
    task.check_config(config, strategy)
    return config


def apply_strategy(model: Any, name: str, task: str | None = None, **options: Any) -> Any:
    """Python API: apply the named strategy with options to a model you loaded with
    transformers (e.g. `AutoModelForSequenceClassification.from_pretrained(...)` or
    `AutoModelForCausalLM.from_pretrained(...)`). `task` names the task kind; by default it is
    the one the model's class was built for."""
    return build_strategy(name, options).apply(model, resolve_task(task)[0] if task else task_for_model(model))


def config_from_record(record: RunRecord, **overrides: Any) -> RunConfig:
    """The config a finished run reloads with: its own, in the dtype and precision it trained
    in (so that it reloads the same wherever it reloads), with `overrides` (None: keep)."""
    return make_config({**record.config_values(), **record.trained_precision(),
                        **{k: v for k, v in overrides.items() if v is not None}})


def check_pooling(pooling: str, task: Task) -> None:
    """Refuse mean pooling for a task whose head reads every token (before anything loads)."""
    if pooling == "mean" and not task.reads_one_vector:
        raise PeftkitError(f"pooling=mean makes one vector per example, and task '{task.name}' reads every token: "
                           "use pooling=model (or auto)")


def option_names() -> set[str]:
    """Every run option of every group (the common ones and every registered task's)."""
    return {*CommonOptions.model_fields, *(name for task in TASKS.values() for name in task.options.model_fields)}


def _task_of(values: dict[str, Any]) -> Task:
    name = values.get("task", CommonOptions.model_fields["task"].default)
    if name is None:
        return TASKS["classification"]
    if not isinstance(name, str):
        raise PeftkitError(f"option 'task': a task is named by a string (sst2, classification, ...), got {name!r}")
    return resolve_task(name)[0]


def _own_keys(values: dict[str, Any], task: Task) -> dict[str, Any]:
    """The values without another group's keys left at their defaults (old recipes and
    records carry every task's columns, unset); another group's key that is set, or a key of
    no group, is refused in one line."""
    own = {*CommonOptions.model_fields, *task.options.model_fields}
    for key in [k for k in values if k not in own]:
        owners = [other for other in TASKS.values() if key in other.options.model_fields]
        if not owners:
            raise PeftkitError(unknown_option(str(key), task, values.get("strategy")))
        if values[key] == owners[0].options.model_fields[key].default:
            del values[key]
        elif key in GenerationOptions.model_fields:
            raise PeftkitError(f"{key} sets how answers are generated, and task '{task.name}' generates no text: "
                               "drop it")
        else:
            raise PeftkitError(f"{key} is an option of task '{owners[0].name}', and this run's task is "
                               f"'{task.name}': drop it or pick a {owners[0].name} task")
    return values


def _strategy_of(values: dict[str, Any]) -> Any:
    raw = values.get("strategy", CommonOptions.model_fields["strategy"].default_factory())
    try:
        spec = raw if isinstance(raw, StrategySpec) else StrategySpec.model_validate(raw)
    except pydantic.ValidationError as err:
        raise PeftkitError(explain(err, None, prefix="strategy")) from None
    return build_strategy(spec.name, spec.options)


def unknown_option(key: str, task: Task, strategy: Any) -> str:
    """One line for a key of no group: the closest option there is, and the groups this
    task's runs take (the common options, the task's own, the strategy's)."""
    name = strategy.get("name") if isinstance(strategy, dict) else strategy if isinstance(strategy, str) else "lora"
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    strategy_options = cls.option_names() if cls is not None else []
    own = list(task.options.model_fields)
    groups = ["the common options (`peftkit train --help`)", f"task {task.name}'s ({_listed(own)})",
              f"strategy {name}'s ({_listed(strategy_options)})" if cls is not None else "the strategy's"]
    hint = did_you_mean(key, [*CommonOptions.model_fields, *own, *strategy_options])
    return f"unknown option '{key}'{hint}: runs of task {task.name} take {', '.join(groups[:-1])} and {groups[-1]}"


def _listed(names: list[str]) -> str:
    return ", ".join(names) or "none"


def explain(err: pydantic.ValidationError, task: Task | None, prefix: str = "") -> str:
    """One line for the first problem in a pydantic error, with what the option means (a key
    of no group never gets here: `make_config` answers it with the groups there are)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    message = first["msg"].removeprefix("Value error, ")
    field = config_class(task.options).model_fields.get(str(first["loc"][0])) if task and first["loc"] else None
    meaning = f" ({loc}: {_first_sentence(field.description)})" if field is not None and field.description else ""
    return f"option '{loc}': {message}{meaning}" if loc else message


def _first_sentence(text: str) -> str:
    """A description's first sentence (its opening clause where that runs long)."""
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 100 else sentence.split(";")[0].split(":")[0]


__all__ = ["apply_strategy", "check_pooling", "config_from_record", "explain", "make_config", "option_names", "unknown_option"]
