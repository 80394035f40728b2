"""The one exception type the CLI turns into a one-line message and exit code 2.

Anything raised as `PeftkitError` is the user's to fix (bad flag, missing file, wrong
column); its message names the problem and the fix. Any other exception is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftkitError(Exception):
    """A problem with the user's input, explained in one line: line breaks that come with
    the input (a strategy name, a value read from a file) are shown escaped."""

    def __init__(self, message: str):
        super().__init__(message.strip().replace("\r", "\\r").replace("\n", "\\n"))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
