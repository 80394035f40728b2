"""Library messages that tell a peftkit user nothing, dropped at their source by logging
filters; every other warning and log line still shows (nothing is silenced wholesale).

- bitsandbytes, on CPUs with AVX512-BF16: a faster *inference* kernel package is missing.
  peftkit keeps 4-bit layers in their training layout anyway (models.keep_4bit_training_layout).
- transformers' load report, while peftkit loads a task model: peftkit reads the same report
  (`output_loading_info`) and refuses, in one line, any load it does not explain
  (`models.check_load`); what passes lists only the new head and unused checkpoint modules.
- transformers' FutureWarning that `is_gradient_checkpointing` is deprecated, raised when PEFT
  (0.21) reads that attribute while wrapping a model, and pyarrow's (25) FutureWarning about
  `null_placement` when datasets sorts the evaluation split by length: nothing a user can change.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
TRANSFORMERS_LOADING_LOGGER = "transformers.modeling_utils"


class _DropRecords(logging.Filter):
    """Drops the records for which `drop(record)` is true."""

    def __init__(self, drop: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.drop(record)


def install() -> None:
    """The filters that hold for the whole process (idempotent)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropRecords) for f in logger.filters):
        logger.addFilter(_DropRecords(lambda record: "gemm_4bit_forward from kernels-community" in record.getMessage()))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Specifying null_placement in SortOptions", category=FutureWarning)


@contextlib.contextmanager
def load_report_checked() -> Iterator[None]:
    """While a task model loads under `models.check_load`: drop transformers' load report
    (logged by `log_state_dict_report`), which that check reads from the library's own
    loading info instead. A report it does not explain stops the run with its one line;
    one it explains (the new head's weights, checkpoint modules the task does not use)
    would only alarm. The record is told by the function that logs it, not by its text."""
    logger = logging.getLogger(TRANSFORMERS_LOADING_LOGGER)
    dropping = _DropRecords(lambda record: record.funcName == "log_state_dict_report")
    logger.addFilter(dropping)
    try:
        yield
    finally:
        logger.removeFilter(dropping)
