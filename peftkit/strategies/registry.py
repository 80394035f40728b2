"""Strategies by name: the registry's one entry point, which builds a strategy from its
name and options (validated against its dataclass fields), registering the generated
`peft:<method>` strategies on first use."""

from __future__ import annotations

from typing import Any

import pydantic

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.strategies.base import STRATEGIES, Strategy


def load_peft_registry() -> None:
    """Register every `peft:<method>` strategy (imports PEFT: done only when one is asked for)."""
    import peftkit.strategies.peft_registry  # noqa: F401  (registration side effect)


def build_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """Validate `options` against the strategy's fields and return the instance."""
    if name.startswith("peft:") and name not in STRATEGIES:
        load_peft_registry()
    cls = STRATEGIES.get(name)
    if cls is None:
        own = sorted(n for n in STRATEGIES if not n.startswith("peft:"))
        raise PeftkitError(
            f"unknown strategy '{name}'{did_you_mean(name, STRATEGIES)}; choose one of: {', '.join(own)}, "
            "or peft:<method> for any other PEFT method (`peftkit strategies` lists them)"
        )
    options = dict(options or {})
    valid = cls.option_names()
    for key in options:
        if key == "pooling" and key not in valid:
            raise PeftkitError(f"pooling is a run setting, not an option of strategy '{name}', so that every strategy "
                               "reads the model alike: put `pooling: mean` at the top of the recipe, or --set pooling=mean")
        if key not in valid:
            raise PeftkitError(
                f"strategy '{name}' has no option '{key}'{did_you_mean(key, valid)}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )
    try:
        return pydantic.TypeAdapter(cls).validate_python(options)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PeftkitError(
            f"strategy '{name}' option '{where}': {first['msg']} (got {first.get('input')!r})"
        ) from None
