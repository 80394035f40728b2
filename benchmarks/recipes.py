"""Train every recipe matching a pattern, each in a fresh process, and publish one table.

    python benchmarks/recipes.py --recipes 'recipes/minilm-sst2-*.yaml' --data-dir ../shared/data \
        --runs runs/bench-minilm-sst2 --out benchmarks/results/minilm_sst2_recipes

A fresh process per run keeps peak memory honest. Finished runs (a run.json present) are
kept and not retrained, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

COLUMNS = ("recipe", "strategy", "base", "dev acc", "macro-F1", "trainable", "trainable %", "epochs", "lr",
           "train s", "samples/s", "tokens/s", "peak MB", "disk MB")


def run_recipe(recipe: Path, data_dir: str, run_dir: Path) -> dict:
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        command = [sys.executable, "-m", "peftkit.cli", "train", "--recipe", str(recipe),
                   "--data-dir", data_dir, "--output-dir", str(run_dir), "--overwrite"]
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads(record_path.read_text())


def row(recipe: Path, record: dict) -> list[str]:
    cfg = record["config"]
    four_bit = cfg["strategy"].get("quant_type") or (cfg.get("quantization") if cfg.get("quantization") != "none" else None)
    return [
        recipe.stem, cfg["strategy"]["name"], f"4-bit {four_bit}" if four_bit else "full precision",
        f"{record['metrics']['accuracy']:.4f}",
        f"{record['metrics']['macro_f1']:.4f}", f"{record['trainable_params']:,}",
        f"{record['trainable_percent']:.3f}", f"{record['epochs_trained']:g}", f"{record['learning_rate']:g}",
        f"{record['train_time_s']:.0f}", f"{record['samples_per_s']:.1f}", f"{record['tokens_per_s']:.0f}",
        f"{record['peak_memory_bytes'] / 2**20:.0f}", f"{record['size_on_disk_bytes'] / 2**20:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", required=True, nargs="+", help="recipe files or globs")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--runs", required=True, type=Path, help="where the runs are written")
    parser.add_argument("--out", required=True, type=Path, help="results path without suffix (.md and .json written)")
    args = parser.parse_args()

    recipes = [Path(p) for pattern in args.recipes for p in sorted(glob.glob(pattern))]
    records = {r.stem: run_recipe(r, args.data_dir, args.runs / r.stem) for r in recipes}
    any_record = next(iter(records.values()))
    command = "python " + shlex.join(sys.argv)
    lines = [
        f"# {args.out.name}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {dt.date.today().isoformat()}; machine: {any_record['device']}, {platform.platform()}; "
        + ", ".join(f"{k} {v}" for k, v in any_record["versions"].items()),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row(Path(name), rec)) + " |" for name, rec in records.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": records}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
