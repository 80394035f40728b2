"""The comparison harness: a matrix of (strategy, seed) runs, each in a fresh process.

A fresh process per run keeps peak memory honest and lets one crash fail one row, not the
matrix. Every finished run appends one JSON line to `OUT/runs.jsonl` (flushed and synced);
re-running the same command skips what is recorded and continues a run that was cut short
from its last checkpoint (same options; its record then sums the training time of its
processes, each step counted once), so a matrix killed at any moment resumes without
repeating finished work. Each strategy's hyperparameters come from its own recipe
(`RECIPE_DIR/<model>-<task>-<strategy>.yaml`) or its own defaults, never from another
strategy's; `--set` applies to every run, because the user said so. A label such as
`adapter-houlsby` names a recipe (`<model>-<task>-adapter-houlsby.yaml`) for one setting of a
strategy, so one matrix can hold several variants of the same strategy; `peft:loha`'s recipe
is `<model>-<task>-peft-loha.yaml`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

from peftkit.checkpoints import resumable
from peftkit.errors import PeftkitError
from peftkit.options import RunConfig
from peftkit.provenance import code_version, config_hash
from peftkit.recipes import apply_overrides, load_recipe
from peftkit.record import CellRecord, cell_key, read_cell, read_record
from peftkit.resolve import make_config

RUNS_FILE = "runs.jsonl"
# Comparisons publish peak memory: their runs fix glibc's mmap threshold, so a peak follows the
# memory in use rather than heap fragmentation (peftkit.cpu.allocator); a recipe or --set may differ.
PUBLISHED_MMAP_THRESHOLD_KB = 1024


@dataclass(frozen=True)
class Cell:
    """One (strategy, seed) run of the matrix, with its validated configuration."""

    strategy: str
    seed: int
    config: RunConfig
    recipe: Path | None

    @property
    def key(self) -> str:
        return cell_key(self.strategy, self.seed)


def plan(model: str, task: str, strategies: list[str], seeds: list[int], out: Path, recipe_dir: Path | None,
         overrides: list[str], data_dir: Path | None) -> list[Cell]:
    """Every cell's configuration, validated before anything runs."""
    cells = []
    for strategy in strategies:
        recipe = _recipe_for(recipe_dir, model, task, strategy)
        values: dict[str, Any] = load_recipe(recipe) if recipe else {"strategy": strategy}
        for seed in seeds:
            cell_values = {"cpu_mmap_threshold_kb": PUBLISHED_MMAP_THRESHOLD_KB, **values, "model": model, "task": task,
                           "seed": seed, "overwrite": True, "output_dir": str(run_directory(out, strategy, seed))}
            if data_dir is not None:
                cell_values["data_dir"] = str(data_dir)
            config = make_config(apply_overrides(cell_values, overrides))
            name = config.strategy.name
            if strategy != name and not strategy.startswith(name + "-"):
                raise PeftkitError(f"recipe {recipe} trains '{name}', which label '{strategy}' does not name")
            cells.append(Cell(strategy, seed, config, recipe))
    return cells


def run_directory(out: Path, strategy: str, seed: int) -> Path:
    """Where a comparison in `out` keeps one cell's run (weights, run.json, predictions)."""
    return out / "runs" / f"{strategy}-seed{seed}"


def _recipe_for(recipe_dir: Path | None, model: str, task: str, strategy: str) -> Path | None:
    if recipe_dir is None:
        return None
    if not recipe_dir.is_dir():
        raise PeftkitError(f"recipe directory {recipe_dir} does not exist")
    path = recipe_dir / f"{Path(model).name}-{task}-{strategy.replace(':', '-')}.yaml"  # peft:loha -> peft-loha
    return path if path.is_file() else None


def read_runs(out: Path) -> dict[str, CellRecord]:
    """Recorded runs by key; a line cut short by a kill is ignored (it will be re-run)."""
    path = out / RUNS_FILE
    return parse_runs(path.read_text(), path) if path.is_file() else {}


def parse_runs(text: str, source: Path | str = RUNS_FILE) -> dict[str, CellRecord]:
    """The records of a runs.jsonl text (read from `source`) by key, a later line of a
    (strategy, seed) replacing an earlier one; a line that does not parse (cut short by a
    kill) is skipped, and one that parses but is no record this peftkit reads is refused in
    one line naming it."""
    records: dict[str, CellRecord] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            values = json.loads(line)
        except json.JSONDecodeError:
            continue
        record = read_cell(values, f"{source} line {number}")
        records[record.key] = record
    return records


def append_run(out: Path, record: CellRecord) -> None:
    """Append one record as one line, flushed and synced before returning."""
    path = out / RUNS_FILE
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        _drop_partial_last_line(path)
    with path.open("a") as f:
        f.write(json.dumps(record.line()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def forget(out: Path, keys: set[str]) -> None:
    """Rewrite runs.jsonl without the given runs (failed ones about to be retried), so the
    file keeps exactly one record per (strategy, seed). Written aside, then renamed."""
    path = out / RUNS_FILE
    kept = [r for k, r in read_runs(out).items() if k not in keys]
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps(r.line()) + "\n" for r in kept))
    staging.replace(path)


def _drop_partial_last_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\n") + 1])


def launcher(num_processes: int = 1, accelerate_config: Path | None = None) -> list[str]:
    """The command that starts a cell's `peftkit train`: this Python, or `accelerate launch`
    with N data-parallel processes and/or an accelerate config file. (`--multi_gpu` also
    starts CPU ranks, with gloo, where there is no GPU; accelerate's `--cpu` launcher would
    start one process.)"""
    if num_processes == 1 and accelerate_config is None:
        return [sys.executable]
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise PeftkitError(f"--accelerate-config {accelerate_config} does not exist: see recipes/accelerate/")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        command += ["--config_file", str(accelerate_config)]
    if num_processes > 1:
        command += ["--num_processes", str(num_processes)]
        if accelerate_config is None:
            command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command


def run_cell(cell: Cell, out: Path, command: str | None = None, start: list[str] | None = None,
             may_resume: bool = True) -> CellRecord:
    """Train one cell in a fresh `peftkit train` process (started by `start`, default this
    Python; see `launcher`), continuing it from its checkpoints where an interrupted matrix
    left some made with the same options by the same code (unless `may_resume` is false: a
    cell whose last attempt failed starts over); the record says ok or failed, and keeps the
    `peftkit compare` command line that asked for it."""
    from peftkit.memory.estimate import estimate_for

    config = cell.config
    resuming = may_resume and resumable(config, Path(config.output_dir), code_version()["commit"])
    config_path = out / "configs" / f"{cell.strategy}-seed{cell.seed}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    started = config.model_copy(update={"resume": True, "overwrite": False}) if resuming else config
    config_path.write_text(yaml.safe_dump(started.model_dump(mode="json"), sort_keys=False))
    log_path = out / "logs" / f"{cell.strategy}-seed{cell.seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a" if resuming else "w") as log:
        returncode = _run_cell_process([*(start or [sys.executable]), "-m", "peftkit.cli", "train", "--recipe",
                                        str(config_path)], log)
    if resuming:  # the cell's config as planned, which trains it whole
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    base = {"strategy": cell.strategy, "seed": cell.seed, "recipe": str(cell.recipe) if cell.recipe else None,
            "command": command, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if returncode == 0:
        run = read_record(Path(cell.config.output_dir))
        return CellRecord(**base, status="ok", error=None, run=run, estimate=estimate_for(cell.config, run.dump()))
    return CellRecord(**base, status="failed", error=_last_error(log_path, returncode),
                      estimate=estimate_for(cell.config, None))


def _run_cell_process(command: list[str], log: IO[str]) -> int:
    """Run a cell's process and return its exit status; if this process stops waiting for any
    reason (an error, Ctrl-C, the SIGTERM `stop_cells_on_sigterm` turns into an exit), the
    cell's process ends too, so no run is left training, unrecorded, beside whatever starts
    next: SIGTERM first (a multi-process `accelerate launch` passes it on to its ranks),
    SIGKILL after 30 s."""
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def stop_cells_on_sigterm() -> None:
    """Make SIGTERM (what `kill`, `timeout` and job schedulers send) end this process as
    Ctrl-C does, by an exception, so the running cell's process is ended with it;
    Python's default would end this process alone. Exit status 128 + 15, as a shell reports."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _last_error(log_path: Path, returncode: int) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ") or "Error" in line]
    return (errors or lines or [f"exit code {returncode}"])[-1][:500]


def pending(cells: list[Cell], records: dict[str, CellRecord], retry_failed: bool) -> list[Cell]:
    """Cells with no record yet, those whose recorded config differs from the cell's now (its
    recipe or the command's options changed, or its record is from before configs were
    hashed), and failed ones when asked to retry them."""
    def stale(cell: Cell) -> bool:
        made = records[cell.key].run.provenance if records[cell.key].run else None
        return records[cell.key].status == "ok" and (made.config_hash if made else None) != config_hash(cell.config)

    return [c for c in cells if c.key not in records or stale(c) or (retry_failed and records[c.key].status != "ok")]
