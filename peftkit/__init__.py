"""peftkit: fine-tune pretrained Transformers with any strategy behind one interface.

The public API is loaded lazily, so `import peftkit.errors` (and a CLI call that fails on
bad input) does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "RunConfig": "peftkit.options",
    "RunResult": "peftkit.run",
    "train": "peftkit.run",
    "apply_strategy": "peftkit.resolve",
    "register": "peftkit.strategies",
    "Strategy": "peftkit.strategies",
}
__all__ = [*_API, "__version__"]

from peftkit import library_noise  # noqa: E402 - logging filters only: imports nothing heavy

library_noise.install()


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'peftkit' has no attribute '{name}'")
