"""Shared fixtures: where the real data sets are, and quiet libraries."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PEFTKIT_TEST_DATA_DIR", REPO.parent / "shared" / "data"))
# precision auto on CPU follows the CPU's bf16 instructions: the suite pins fp32 (inherited by the
# subprocesses it starts) so that its numbers do not depend on the CPU that runs it; the bf16
# paths are tested by asking for them (dtype/precision bf16), or all of it with PEFTKIT_CPU_BF16=1
os.environ.setdefault("PEFTKIT_CPU_BF16", "0")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data sets (../shared/data beside the clone); never copied into the repo."""
    assert (DATA_DIR / "sst2" / "train.jsonl").is_file(), f"real data sets not found at {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(autouse=True, scope="session")
def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture
def jsonl(tmp_path):
    """Writes rows as a JSON Lines file under tmp_path and returns its path."""
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write
