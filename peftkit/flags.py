"""Command-line options generated from the option schemas: a field's name becomes its flag,
its type the flag's type, its description and default the flag's help. A command names the
fields it takes, so no command re-declares an option that `peftkit.options` already has.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import pydantic
import typer
from pydantic.fields import FieldInfo

from peftkit.errors import PeftkitError
from peftkit.options import CommonOptions, StrategySpec
from peftkit.tasks import TASKS

NO_DEFAULT: Any = object()  # a command's own default for a flag: it is required
SCHEMA_DEFAULT: Any = object()  # a command's own default for a flag: the schema's default, given when left out


def schema_groups() -> list[tuple[str, dict[str, FieldInfo]]]:
    """(label, fields) of every option group a run can have: the common options, then each
    registered task kind's own (named by the kinds that read it)."""
    groups: list[tuple[str, dict[str, FieldInfo]]] = [("", dict(CommonOptions.model_fields))]
    tasks = sorted(TASKS.values(), key=lambda task: task.name)
    readers: dict[str, list[str]] = {}
    for task in tasks:
        for name in task.options.model_fields:
            readers.setdefault(name, []).append(task.name)
    seen: set[str] = set()
    for task in tasks:
        own = {n: f for n, f in task.options.model_fields.items() if n not in seen}
        seen |= set(own)
        by_readers: dict[str, dict[str, FieldInfo]] = {}
        for name, field in own.items():
            by_readers.setdefault(", ".join(readers[name]), {})[name] = field
        groups += list(by_readers.items())
    return groups


def option_fields() -> dict[str, tuple[str, FieldInfo]]:
    """Every run option by name: the label of its group and its field."""
    return {name: (label, field) for label, fields in schema_groups() for name, field in fields.items()}


def flag_names(name: str, field: FieldInfo) -> list[str]:
    """The flags of an option: its schema's own (`--lr` beside `--learning-rate`) or --name-with-dashes."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return list(extra.get("flags", [f"--{name.replace('_', '-')}"]))


def _flag_type(annotation: Any) -> tuple[Any, str]:
    """The flag's Python type, and the values a Literal allows ('' otherwise)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    inner = [a for a in typing.get_args(annotation) if a is not type(None)][0] if union else annotation
    if typing.get_origin(inner) is Literal:
        return str, " | ".join(str(v) for v in typing.get_args(inner))
    if inner is StrategySpec:
        return str, ""
    if typing.get_origin(inner) is list:
        return list[str], ""
    if inner in (str, int, float, bool, Path):
        return inner, ""
    raise TypeError(f"no flag type for {annotation!r}")


def _default_of(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        value = field.default_factory()
        return value.name if isinstance(value, StrategySpec) else value
    return field.default


def help_text(label: str, field: FieldInfo, extra: str = "", default: Any = NO_DEFAULT) -> str:
    """A flag's help: the group it belongs to, the description, the choices and default
    (the schema's, unless the command has its own)."""
    kind, choices = _flag_type(field.annotation)
    default = _default_of(field) if default is NO_DEFAULT else default
    tail = [f"one of {choices}"] if choices else []
    if default is not None and kind is not bool:
        tail.append(f"default {default}")
    elif kind is bool:
        tail.append(f"default {'on' if default else 'off'}")
    prefix = f"[{label}] " if label else ""
    return f"{prefix}{field.description}{extra}" + (f" ({'; '.join(tail)})" if tail else "")


def parameter(name: str, label: str, field: FieldInfo, *, default: Any = None, extra_help: str = "") -> inspect.Parameter:
    """The typer option of one schema field; `default` None means "not given" (the recipe's
    or the schema's value stands), NO_DEFAULT makes the flag required, SCHEMA_DEFAULT gives the
    schema's default when it is left out."""
    kind, _ = _flag_type(field.annotation)
    if default is SCHEMA_DEFAULT:
        default = _default_of(field)
    flags = flag_names(name, field)
    if kind is bool:
        flags = [f"{flags[0]}/--no-{flags[0].removeprefix('--')}"]
    value = ... if default is NO_DEFAULT else default
    shown = NO_DEFAULT if default is None else None if default is NO_DEFAULT else default
    option = typer.Option(value, *flags, help=help_text(label, field, extra_help, shown), show_default=False)
    annotation = kind if default is not None and default is not NO_DEFAULT else Optional[kind]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def check_values(values: dict[str, Any]) -> None:
    """Validate option values against their fields alone (for commands that build no run
    config, such as `estimate`): one line naming the option and the problem."""
    fields = option_fields()
    for name, value in values.items():
        field = fields[name][1]
        try:
            pydantic.TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
        except pydantic.ValidationError as err:
            raise PeftkitError(f"option '{name}': {err.errors()[0]['msg']}") from None


def with_options(names: list[str] | None = None, *, into: str = "options", defaults: dict[str, Any] | None = None,
                 extra_help: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a command with one flag per run option in `names` (None: every option of every
    group). The command receives the options that were given as a dict in its `into` argument;
    `defaults` gives a flag a default of its own (NO_DEFAULT: required; SCHEMA_DEFAULT: the
    schema's) instead of "not given"."""
    defaults, extra_help = defaults or {}, extra_help or {}

    def decorate(command: Callable) -> Callable:
        fields = option_fields()
        chosen = list(fields) if names is None else names
        own = [p for p in inspect.signature(command).parameters.values() if p.name != into]
        generated = [parameter(n, fields[n][0], fields[n][1], default=defaults.get(n), extra_help=extra_help.get(n, ""))
                     for n in chosen]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in chosen}
            values = {n: str(v) if isinstance(v, Path) else v for n, v in given.items() if v is not None and v != []}
            return command(**kwargs, **{into: values})

        hints = typing.get_type_hints(command)
        wrapper.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**{p.name: hints.get(p.name, p.annotation) for p in own},
                                   **{p.name: p.annotation for p in generated}}
        del wrapper.__wrapped__  # typer reads the signature above, not the command's own
        return wrapper

    return decorate


def option_reference() -> str:
    """The docs' option reference in Markdown: every group's options with their flag, type,
    default and description, from the same fields `--help` reads."""
    lines = ["# Option reference", "",
             "Every run option, as a recipe key, a `peftkit train` flag and a `--set key=value`. Generated from the "
             "option schemas (`peftkit.options`) by `python -m peftkit.flags`; a strategy's own options are listed by "
             "`peftkit strategies`.", ""]
    for label, fields in schema_groups():
        lines += [f"## {'Common options' if not label else f'Options of {label}'}", "",
                  "| option | flag | type | default | description |", "|---|---|---|---|---|"]
        for name, field in fields.items():
            kind, choices = _flag_type(field.annotation)
            shown = choices or getattr(kind, "__name__", str(kind)).replace("list", "list of str")
            default = _default_of(field)
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | `{' '.join(flag_names(name, field))}` | {shown.replace('|', 'or')} | "
                         f"{'' if default is None else f'`{default}`'} | {description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(option_reference(), end="")
