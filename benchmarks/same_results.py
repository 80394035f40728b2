"""Do two versions of peftkit compute the same thing? Trains the same recipes with the code of
two git commits, each run in a fresh process, and tables the metrics side by side.

Made to check that moving classification onto the task registry changed no result: one
recipe per strategy family, a fixed seed, the same data, identical metrics expected.

    python benchmarks/same_results.py --before 94df403 --after HEAD --data-dir ../shared/data \
        --set max_train_samples=1000 --set epochs=1 --out benchmarks/results/task_registry_move
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("full", "partial", "linear-probe", "bitfit", "lora", "qlora", "adapter-houlsby", "ia3", "prompt-tuning")


def checkout(commit: str, where: Path) -> Path:
    """A worktree of `commit` (detached), so both versions run side by side with one venv."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit], check=True,
                   capture_output=True)
    return where


def train(code: Path, recipe: Path, out: Path, data_dir: Path, overrides: list[str]) -> dict:
    """One `peftkit train` with the given code on the import path; returns its run record."""
    command = [sys.executable, "-m", "peftkit.cli", "train", "--recipe", str(recipe), "--data-dir", str(data_dir),
               "--output-dir", str(out), "--overwrite", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{recipe.name} failed with {code}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads((out / "run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="labels of recipes/minilm-sst2-<label>.yaml")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    commits = {name: subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                                    text=True).stdout.strip() for name, ref in (("before", args.before), ("after", args.after))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftkit-same-") as scratch:
        codes = {name: checkout(commit, Path(scratch) / name) for name, commit in commits.items()}
        try:
            for label in args.recipes.split(","):
                recipe = f"recipes/minilm-sst2-{label}.yaml"
                records = {name: train(code, code / recipe, Path(scratch) / "runs" / f"{label}-{name}",
                                       args.data_dir.resolve(), args.overrides) for name, code in codes.items()}
                rows.append({"recipe": label, **{f"{name}_{metric}": records[name]["metrics"][metric]
                                                 for name in codes for metric in ("accuracy", "loss")}})
                print(json.dumps(rows[-1]), flush=True)
        except KeyboardInterrupt:
            raise SystemExit("interrupted: nothing written")
        finally:
            for code in codes.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code)], capture_output=True)
    command = " ".join(["python benchmarks/same_results.py", *sys.argv[1:]])
    lines = [f"# Same results before ({commits['before']}) and after ({commits['after']})", "",
             f"Command: `{command}`  ", "MiniLM on SST-2 (full validation split), one recipe per strategy family, seed 0.", "",
             "| recipe | accuracy before | accuracy after | loss before | loss after | identical |", "|---|---|---|---|---|---|"]
    for row in rows:
        same = row["before_accuracy"] == row["after_accuracy"] and abs(row["before_loss"] - row["after_loss"]) < 1e-6
        lines.append(f"| {row['recipe']} | {row['before_accuracy']:.4f} | {row['after_accuracy']:.4f} | "
                     f"{row['before_loss']:.6f} | {row['after_loss']:.6f} | {'yes' if same else 'NO'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
