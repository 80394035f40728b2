"""A finished run's record (run.json), read without torch: every command that takes a run
checks it, and what it asks of the run, before any library or weight loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.config import RunConfig, config_values, make_config
from peftkit.errors import PeftkitError

RUN_RECORD = "run.json"


def read_record(run_dir: Path) -> dict[str, Any]:
    """The run.json of a finished run, or a clear error."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except OSError:
        raise PeftkitError(f"{run_dir} is not a peftkit run: no readable {RUN_RECORD}") from None
    except json.JSONDecodeError as err:
        raise PeftkitError(f"{path} is not valid JSON ({err.msg}); the run is damaged, train it again") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise PeftkitError(f"{path} is not a peftkit run record (no config in it): point --run at a run directory")
    return record


def task_kind(record: dict[str, Any]) -> str:
    """The task kind the run trained (records from before it was kept are classifiers)."""
    return record.get("task_kind", "classification")


def run_config(record: dict[str, Any], **overrides: Any) -> RunConfig:
    """The config a finished run reloads with: its own, in the dtype and precision it trained
    in (so that it reloads the same wherever it reloads), with `overrides` (None: keep)."""
    return make_config({**config_values(record), **trained_precision(record),
                        **{k: v for k, v in overrides.items() if v is not None}})


def trained_precision(record: dict[str, Any]) -> dict[str, str]:
    """The dtype and precision a run trained in. Records from before they were kept resolved
    auto to fp32 on CPU (and their own device's choice on a GPU, which auto still makes)."""
    if "precision" in record:
        return {"dtype": record["precision"]["weights"], "precision": record["precision"]["compute"]}
    if not str(record.get("device", "")).startswith("cpu"):
        return {}
    dtype, precision = record["config"].get("dtype", "auto"), record["config"].get("precision", "auto")
    return {**({"dtype": "fp32"} if dtype == "auto" else {}),
            **({"precision": "fp32"} if precision == "auto" and dtype in ("auto", "fp32") else {})}
