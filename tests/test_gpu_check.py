"""benchmarks/gpu/check.py --smoke: the GPU check's whole path (random checkpoint, peftkit's
loading, every strategy through the SFT trainer, the table beside the estimate) on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu" / "check.py"


@pytest.mark.slow
def test_smoke_run_measures_every_strategy(tmp_path):
    out = tmp_path / "check.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny-llama")]
    assert [r[1].strip() for r in rows] == ["full", "lora", "qlora", "dora", "adapter", "prompt-tuning"]
    for row in rows:
        assert row[-1].strip() == "ok"
        step_s, tokens_per_s, peak, estimate = (float(row[i].replace(",", "")) for i in (3, 4, 5, 7))
        # the CPU smoke run keeps its cells in one process, where a later cell can reuse memory an
        # earlier one freed: its peak may read 0 (the GPU run gives each cell its own process)
        assert step_s > 0 and tokens_per_s > 0 and peak >= 0 and estimate > 0
