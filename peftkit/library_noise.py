"""Library messages that tell a peftkit user nothing, dropped at their source by logging
filters; every other warning and log line still shows (nothing is silenced wholesale).

- bitsandbytes, on CPUs with AVX512-BF16: a faster *inference* kernel package is missing.
  peftkit keeps 4-bit layers in their training layout anyway (models.keep_4bit_training_layout).
- transformers' load report, when the only keys it lists are the new task head's weights,
  missing from the checkpoint by design: peftkit initialises that head and says what trains.
- transformers' FutureWarning that `is_gradient_checkpointing` is deprecated, raised when PEFT
  (0.21) reads that attribute while wrapping a model, and pyarrow's (25) FutureWarning about
  `null_placement` when datasets sorts the evaluation split by length: nothing a user can change.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
TRANSFORMERS_LOADING_LOGGER = "transformers.modeling_utils"


class _DropMatching(logging.Filter):
    """Drops the records for which `drop(message)` is true."""

    def __init__(self, drop) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.drop(record.getMessage())


def install() -> None:
    """The filters that hold for the whole process (idempotent)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropMatching) for f in logger.filters):
        logger.addFilter(_DropMatching(lambda message: "gemm_4bit_forward from kernels-community" in message))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Specifying null_placement in SortOptions", category=FutureWarning)


@contextlib.contextmanager
def new_head_expected(head_modules: list[str], unused: tuple[str, ...] = ()) -> Iterator[None]:
    """While a task model loads: drop a load report that lists nothing but the new head's
    weights as MISSING, and checkpoint modules the task model has no use for (`unused`, e.g.
    BERT's pooler under a token classifier) as UNEXPECTED. A report with anything else in it
    still shows."""
    def expected(key: str, status: str) -> bool:
        if status == "UNEXPECTED":
            return any(part in unused for part in key.split("."))
        return status == "MISSING" and any(key == h or key.startswith(h + ".") for h in head_modules)

    def only_new_head(message: str) -> bool:
        if "LOAD REPORT" not in message:
            return False
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
        rows = [row for row in rows[1:] if len(row) >= 2 and row[0]]  # after the "Key | Status" header
        return bool(rows) and all(expected(key, status) for key, status, *_ in rows)

    logger = logging.getLogger(TRANSFORMERS_LOADING_LOGGER)
    dropping = _DropMatching(only_new_head)
    logger.addFilter(dropping)
    try:
        yield
    finally:
        logger.removeFilter(dropping)
