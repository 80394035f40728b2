"""Where a run reaches its peak resident memory: before training (loading the model; a linear
probe's frozen feature pass), while the Trainer trains, or after it (the final evaluation).

    python benchmarks/phase_memory.py --data-dir ../shared/data --out benchmarks/results/phase_memory \
        --recipe recipes/minilm-sst2-linear-probe.yaml --recipe recipes/minilm-rte-linear-probe.yaml \
        --set dtype=fp32 --set precision=fp32

A run's record gives one number, its peak above the memory it started from; the estimate
predicts one too. When they disagree, the phase that set the peak says which of the estimate's
terms to look at. Each recipe trains in a fresh process (`peftkit.train`, with the mmap
threshold `peftkit compare` publishes peaks with, an empty feature cache and the `--set`
overrides), while a thread samples the resident size every 2 ms. Phases are marked where they
begin: the feature pass (`caches.features.head_inputs`, computing a frozen model's head inputs),
training (`transformers.Trainer.train`, whose per-epoch evaluations count as training) and what
follows it. Growth is above the baseline the run's own `PeakMemory` takes; a 2 ms sample can
miss a shorter spike, which the record's VmHWM peak does not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import FreshProcessError, command_line, in_fresh_process, one_clean_commit, stamp, write_result

MB = 2**20
PHASES = ("before training", "feature pass", "training", "after training")


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def measure_one(recipe: Path, data_dir: str, overrides: list[str], scratch: str) -> dict:
    """In this process: train the recipe while sampling RSS, and the largest growth per phase."""
    import transformers

    import peftkit
    import peftkit.caches.features
    import peftkit.measure
    from peftkit.compare import PUBLISHED_MMAP_THRESHOLD_KB
    from peftkit.recipes import apply_overrides, load_recipe

    phase, baseline, peaks, sampling = ["before training"], [0], dict.fromkeys(PHASES, 0), [True]

    def sample() -> None:
        while sampling[0]:
            peaks[phase[0]] = max(peaks[phase[0]], resident_bytes())
            time.sleep(0.002)

    def marked(function, name: str, after: str | None = None):
        def run(*args, **kwargs):
            before, phase[0] = phase[0], name
            try:
                return function(*args, **kwargs)
            finally:
                phase[0] = after or before
        return run

    start = peftkit.measure.PeakMemory.start

    def start_and_keep(self):
        started = start(self)
        baseline[0] = self.baseline
        return started

    peftkit.measure.PeakMemory.start = start_and_keep
    peftkit.caches.features.head_inputs = marked(peftkit.caches.features.head_inputs, "feature pass")
    transformers.Trainer.train = marked(transformers.Trainer.train, "training", after="after training")
    values = {"cpu_mmap_threshold_kb": PUBLISHED_MMAP_THRESHOLD_KB, **load_recipe(recipe), "data_dir": data_dir,
              "output_dir": f"{scratch}/run", "overwrite": True}
    threading.Thread(target=sample, daemon=True).start()
    record = peftkit.train(apply_overrides(values, overrides)).record
    sampling[0] = False
    return {"recipe": str(recipe), "strategy": record.config["strategy"]["name"], "task": record.config["task"],
            "peak_bytes": record.peak_memory_bytes, "baseline_bytes": baseline[0],
            "growth_bytes": {p: max(peaks[p] - baseline[0], 0) for p in PHASES}, **stamp()}


def measure_in_scratch(recipe: Path, data_dir: str, overrides: list[str]) -> dict:
    """`measure_one` with a scratch directory of its own for the run: the body of a fresh process."""
    with tempfile.TemporaryDirectory() as scratch:
        return measure_one(recipe, data_dir, overrides, scratch)


def write(out: Path, rows: list[dict], command: str) -> None:
    commit = one_clean_commit(rows, "commit first, then run again")
    lines = [
        "# Where a run peaks: resident memory by phase", "",
        f"Command: `{command}`", "",
        f"Date: {rows[0]['date']}; commit {commit[:10]}; machine: {rows[0]['machine']}", "",
        "Each row: one recipe trained by `peftkit.train` in a fresh process (empty feature cache, mmap threshold "
        "1 MB as `peftkit compare` publishes peaks), resident size sampled every 2 ms; growth per phase is its "
        "largest sample above the run's memory baseline (the weights' pages, loaded after it, included). "
        "Peak: the run's record (VmHWM above the same baseline).", "",
        "| recipe | strategy | task | " + " | ".join(f"{p} MiB" for p in PHASES) + " | record's peak MiB |",
        "|---|---|---|" + "---|" * len(PHASES) + "---|",
    ]
    for r in rows:
        growth = " | ".join(f"{r['growth_bytes'][p] / MB:.0f}" for p in PHASES)
        lines.append(f"| {Path(r['recipe']).name} | {r['strategy']} | {r['task']} | {growth} | {r['peak_bytes'] / MB:.0f} |")
    write_result(out, command, lines, rows)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--recipe", type=Path, action="append", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for recipe in args.recipe:
        with tempfile.TemporaryDirectory() as cache:  # an empty feature cache for each recipe
            try:
                rows.append(in_fresh_process(measure_in_scratch, recipe, args.data_dir, args.overrides,
                                             env={"PEFTKIT_CACHE": cache}))
            except FreshProcessError as error:
                sys.exit(f"error: {recipe} failed: {error.last_line}")
    write(args.out, rows, command_line(__file__))


if __name__ == "__main__":
    main()
