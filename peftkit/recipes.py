"""Option values from a YAML recipe and `--set key=value` flags, as plain data: validated
afterwards, all together, by `peftkit.resolve.make_config`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError
from peftkit.resolve import option_names
from peftkit.strategies import STRATEGIES


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a YAML recipe into a plain dict (validated later, together with any --set)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise PeftkitError(f"cannot read recipe {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise PeftkitError(f"recipe {path} is not valid YAML{_where(err)}: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"recipe {path} must be a mapping of option: value")
    return data


def _where(err: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error (1-based, as editors count), where it has a place."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What the YAML parser found wrong, in its own words, without its multi-line excerpt."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return "; ".join(p for p in parts if p) or str(err).splitlines()[0]


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides. Values are read as YAML (16 -> int, [a,b] -> list).
    `strategy.r=16` or plain `r=16` (any key that is not a run option) set strategy options."""
    values = dict(values)
    strategy = values.get("strategy", "lora")
    if not isinstance(strategy, (str, dict)):
        raise PeftkitError(f"option 'strategy' must be a name (lora) or a mapping ({{name: lora, r: 16}}), got {strategy!r}")
    strategy = {"name": strategy} if isinstance(strategy, str) else dict(strategy)
    run_options = option_names()
    plain: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PeftkitError(f"--set expects key=value, got '{item}'")
        value = _yaml_or_text(raw)
        if key == "strategy":
            strategy = {"name": value}
        elif key.startswith("strategy."):
            strategy[key.removeprefix("strategy.")] = value
        elif key in run_options:
            values[key] = value
        else:
            strategy[key] = value
            plain.append(key)
    _check_plain_keys(plain, strategy.get("name"), run_options)
    values["strategy"] = strategy
    return values


def _check_plain_keys(keys: list[str], strategy_name: Any, run_options: set[str]) -> None:
    """A plain `--set key=value` that is no option of the strategy but close to a run option
    is a typo of that run option (`lerning_rate`), not a strategy option: say so."""
    cls = STRATEGIES.get(strategy_name) if isinstance(strategy_name, str) else None
    if cls is None:
        return  # peft:<method> and unknown names are checked where the strategy is built
    options = set(cls.option_names())

    def best(key: str, names: Any) -> tuple[float, str]:
        return max(((difflib.SequenceMatcher(None, key, n).ratio(), n) for n in names), default=(0.0, ""))

    for key in keys:
        score, run_option = best(key, sorted(run_options))
        if key not in options and score >= 0.8 and score > best(key, options)[0]:
            raise PeftkitError(f"unknown option '{key}' (did you mean '{run_option}'?)")


def _yaml_or_text(raw: str) -> Any:
    """A `--set` value read as YAML (16 -> int, [a,b] -> list), or as plain text when it is
    not YAML (a Jinja chat template, say)."""
    if not raw:
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
