"""Where a result comes from: the code (git commit, and whether the tree had uncommitted
changes) and a hash of the resolved run config. Every run record carries both, `compare`
re-runs a cell whose config hash changed, and `report` refuses to mix code versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

# Options that say where things are or whether to proceed, not what is computed: left out of the config hash.
PLACE_OPTIONS = ("output_dir", "overwrite", "force", "data_dir", "train_file", "validation_file", "test_file")


def config_hash(config: Any) -> str:
    """A short digest of everything in a RunConfig that can change a result: dtype and precision
    as resolved on this machine (auto is bf16 on one CPU and fp32 on another)."""
    values = {k: v for k, v in config.model_dump(mode="json").items() if k not in PLACE_OPTIONS}
    values["dtype"], values["precision"] = config.weights_dtype(), config.compute_precision()
    values["resume"] = False  # a resumed run computes what the run it continues would have (kept, for older hashes)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """The git commit of the peftkit checkout that runs, and whether it had uncommitted
    changes to tracked files; "unknown" outside a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", "peftkit", "pyproject.toml")
    return {"commit": commit, "dirty": bool(status)}
