"""The code a benchmark row was measured with, and the rule every published benchmark table
follows: all of its rows come from one commit with no uncommitted changes to peftkit.

Imported by the benchmark scripts beside it (`python benchmarks/<script>.py` puts this folder on
the import path); the commit is peftkit's own `code_version` of the checkout that runs.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stamp() -> dict:
    """What a row records about where it was measured: commit, date, machine, and whether peftkit
    or a benchmark script had uncommitted changes (results written meanwhile do not count)."""
    from peftkit.provenance import code_version

    version = code_version()
    scripts = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
                             capture_output=True, text=True)
    dirty = version["dirty"] if version["dirty"] is None else version["dirty"] or bool(scripts.stdout.strip())
    return {**version, "dirty": dirty, "date": date.today().isoformat(), "machine": platform.platform()}


def one_clean_commit(rows: list[dict], fix: str) -> str:
    """The commit every row names; exits with one line (ending in `fix`) when the rows name
    several commits or any was measured on a tree with uncommitted changes."""
    commits = {(r["commit"], r["dirty"]) for r in rows}
    if len(commits) != 1 or next(iter(commits))[1]:
        sys.exit(f"error: the rows were measured on different or uncommitted code {sorted(commits)}: {fix}")
    return rows[0]["commit"]
