"""Reward functions for RL with verifiable rewards (task `grpo`), by name, with TRL's signature
`f(prompts, completions, **columns) -> list[float]`: one number per completion, the data's own
columns (the reference `answer`, every `references`) passed by name.

A run names its rewards as `NAME` or `NAME:WEIGHT`: a built-in (the task's answer checks, and
`format`, a regex the whole reply must match), or your own function as `module:function` or
`path/to/file.py:function` (`path.py:function:0.5` with a weight). Each is resolved when the
config is checked, before any weights load: a name that is not a reward, a file that does not
import, a function that is missing or not callable, a bad weight or a `format` without its
pattern each fail in one line. At run time a function that returns the wrong number of values,
or anything but numbers, stops the run in one line naming it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peftkit.errors import PeftkitError, did_you_mean

RewardFunction = Callable[..., list[Any]]


@dataclass(frozen=True)
class Reward:
    """One reward a run trains on: its name (the metric is `reward_<name>`), its weight in the
    total reward, and the function, which checks what it returns (`checked`)."""

    name: str
    weight: float
    function: RewardFunction


def reply_text(completion: Any) -> str:
    """A completion as text: TRL passes text for plain prompts and a list of messages
    ({role, content}) for chat prompts; the messages' contents are joined."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def answer_reward(name: str, key: Callable[[str], Any], column: str = "answer") -> RewardFunction:
    """A reward of 1 where the reply's `key` (its normalized text, its final number; None or ""
    where it has none) equals the reference's in `column`, else 0."""

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        return [float(got not in (None, "") and got == key(expected))
                for got, expected in zip((key(reply_text(c)) for c in completions), columns[column])]

    reward.__name__ = name
    return reward


def format_reward(pattern: str) -> RewardFunction:
    """A reward of 1 where the whole reply matches `pattern` (`.` also matches a newline, so a
    pattern can span a reasoning block and its answer), else 0."""
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:  # noqa: A001 - the reward's name
        return [float(compiled.fullmatch(reply_text(c)) is not None) for c in completions]

    return format


def resolve_rewards(specs: list[str], format_pattern: str | None, builtins: dict[str, RewardFunction]) -> list[Reward]:
    """The rewards `specs` name (each NAME or NAME:WEIGHT; `builtins` are the task's own, beside
    `format` and user functions), each checked and importable, or one line naming the problem."""
    if not specs:
        raise PeftkitError("rewards is empty: name at least one reward, e.g. --set rewards=exact")
    known = [*builtins, "format"]
    rewards = []
    for spec in specs:
        name, target, weight = _parse(spec, known)
        if target == "format":
            function = _format(format_pattern)
        elif target in builtins:
            function = builtins[target]
        else:
            function = load_user_function(target)
        if name in (r.name for r in rewards):
            raise PeftkitError(f"rewards name '{name}' twice: give each reward once (its weight as NAME:WEIGHT)")
        rewards.append(Reward(name, weight, checked(name, function)))
    if format_pattern is not None and "format" not in (r.name for r in rewards):
        raise PeftkitError("format_pattern is set but no reward is 'format': add format to rewards, or drop the pattern")
    return rewards


def _parse(spec: str, known: list[str]) -> tuple[str, str, float]:
    """(its metric name, what it names: a built-in or module:function, its weight) of one spec.
    A built-in's only colon is its weight's; a user function has `module:function`, then
    optionally `:WEIGHT`."""
    parts = spec.strip().split(":")
    if parts[0] in known:
        if len(parts) > 2:
            raise PeftkitError(f"reward '{spec}': write a built-in reward as NAME or NAME:WEIGHT, e.g. {parts[0]}:0.5")
        return parts[0], parts[0], _weight(spec, parts[1] if len(parts) == 2 else "1")
    if len(parts) == 1:
        raise PeftkitError(f"unknown reward '{spec}'{did_you_mean(spec, known)}: use one of {', '.join(known)}, or your "
                           "own function as module:function or path.py:function")
    if len(parts) > 3 or not all(parts[:2]):
        raise PeftkitError(f"reward '{spec}': write your own function as module:function or path.py:function, "
                           "optionally :WEIGHT after it")
    return parts[1], ":".join(parts[:2]), _weight(spec, parts[2] if len(parts) == 3 else "1")


def _weight(spec: str, text: str) -> float:
    """A reward's weight: a finite number."""
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise PeftkitError(f"reward '{spec}': the weight '{text}' is not a finite number (NAME:WEIGHT, e.g. exact:0.5)")
    return weight


def _format(pattern: str | None) -> RewardFunction:
    """The format reward for the run's pattern, which must be given and compile."""
    if pattern is None:
        raise PeftkitError("the format reward needs the regex a reply must match: --set format_pattern='...'")
    try:
        return format_reward(pattern)
    except re.error as err:
        raise PeftkitError(f"format_pattern {pattern!r} is not a regular expression ({err})") from None


@functools.cache
def load_user_function(target: str) -> RewardFunction:
    """Your reward function `module:function` (an importable module) or `path.py:function` (a
    file, imported once per process), checked to exist and be callable."""
    where, name = target.rsplit(":", 1)
    try:
        module = _import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except PeftkitError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the user's module raises, the answer is one line
        first = (str(err).splitlines() or [""])[0][:200]
        raise PeftkitError(f"reward {target}: cannot import {where} ({type(err).__name__}: {first})") from None
    function = getattr(module, name, None)
    if function is None:
        raise PeftkitError(f"reward {target}: {where} has no '{name}'{did_you_mean(name, dir(module))}")
    if not callable(function):
        raise PeftkitError(f"reward {target}: '{name}' is a {type(function).__name__}, not a function "
                           "f(prompts, completions, **columns) -> list of numbers")
    return function


def _import_file(path: Path) -> Any:
    """A Python file as a module, under a name of its own (not on sys.path)."""
    if not path.expanduser().is_file():
        raise PeftkitError(f"reward file {path} does not exist: give path.py:function with a readable file")
    name = f"peftkit_reward_{abs(hash(str(path.expanduser().resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path.expanduser())
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


def checked(name: str, function: RewardFunction) -> RewardFunction:
    """`function`, made to answer in one line when it returns anything but one number (or
    None: no reward for that reply, as TRL reads it) per completion."""

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        values = function(prompts=prompts, completions=completions, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
            raise PeftkitError(f"reward function '{name}' returned {got} for {len(completions)} completions: return a "
                               "list of one number per completion")
        wrong = next((v for v in values if v is not None and not isinstance(v, numbers.Real)), None)
        if wrong is not None:
            raise PeftkitError(f"reward function '{name}' returned {type(wrong).__name__} {wrong!r:.40}: return a "
                               "number (or None) per completion")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = name
    return reward


def score(rewards: list[Reward], prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]
          ) -> tuple[dict[str, list[float]], list[float]]:
    """Each reward's value per completion (None read as NaN), and the total per completion: the
    weighted sum of the rewards there are (NaN ones left out), as TRL adds them."""
    each = {r.name: [math.nan if v is None else v for v in r.function(prompts=prompts, completions=completions,
                                                                      **columns)] for r in rewards}
    totals = [sum(r.weight * each[r.name][i] for r in rewards if not math.isnan(each[r.name][i]))
              for i in range(len(completions))]
    return each, totals
