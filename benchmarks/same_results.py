"""Do two versions of peftkit compute the same thing? Trains the same recipes with the code of
two git commits, each run in a fresh process, and tables every metric and the training losses
side by side.

Made to check that a move of code changed no result: one recipe per strategy family and one
per task kind, a fixed seed, the same data, identical metrics and losses expected. Each run's
record is kept under `--work`, so an interrupted check continues where it stopped and the
"before" side can run while the "after" code is still being written.

    python benchmarks/same_results.py --before 8e8f793 --after HEAD --data-dir ../shared/data \
        --work /tmp/same --out benchmarks/results/layers_move
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import command_line, write_result

from peftkit.record import RunRecord, read_record

REPO = Path(__file__).resolve().parents[1]
SMALL = ("max_train_samples=200", "max_eval_samples=200", "epochs=1")
GENERATE = ("max_generate_samples=16",)
# recipe stem -> the overrides that keep it to a few minutes on 2 cores ({data}: --data-dir)
RECIPES: dict[str, tuple[str, ...]] = {
    **{f"minilm-sst2-{family}": SMALL for family in
       ("full", "partial", "linear-probe", "bitfit", "lora", "qlora", "adapter-houlsby", "ia3", "prompt-tuning")},
    "minilm-conll2003-lora": SMALL,
    "minilm-squad-lora": (*SMALL, "max_length=192"),
    "smollm2-135m-sst2-chat-lora": (*SMALL, *GENERATE, "max_length=128"),
    "flan-t5-small-scitldr-lora": (*SMALL, *GENERATE, "model=tiny-t5", "num_beams=1", "max_length=256",
                                   "train_file={data}/scitldr/train.jsonl",
                                   "validation_file={data}/scitldr/validation.jsonl"),
}


def commit_of(ref: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                          text=True).stdout.strip()


def train(code: Path, recipe: str, out: Path, data_dir: Path) -> RunRecord:
    """One `peftkit train` with the given code on the import path; returns its run record."""
    overrides = [a for o in RECIPES[recipe] for a in ("--set", o.format(data=data_dir))]
    command = [sys.executable, "-m", "peftkit.cli", "train", "--recipe", str(code / "recipes" / f"{recipe}.yaml"),
               "--data-dir", str(data_dir), "--output-dir", str(out), "--overwrite", *overrides]
    env = {**os.environ, "PYTHONPATH": str(code), "PEFTKIT_CPU_BF16": "0"}
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{recipe} failed with {code}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return read_record(out)  # through today's schema, which reads every older record


def kept(work: Path, commit: str, recipe: str) -> Path:
    return work / commit / f"{recipe}.json"


def run_side(commit: str, recipes: list[str], work: Path, data_dir: Path) -> None:
    """Every recipe not yet recorded for `commit`, with that commit's code in a worktree."""
    todo = [r for r in recipes if not kept(work, commit, r).exists()]
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="peftkit-same-") as scratch:
        code = Path(scratch) / "code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(code), commit], check=True,
                       capture_output=True)
        try:
            for recipe in todo:
                record = train(code, recipe, Path(scratch) / "runs" / recipe, data_dir)
                summary = {"metrics": record.metrics,
                           "train_loss_history": [entry.model_dump(mode="json") for entry in record.train_loss_history]}
                kept(work, commit, recipe).parent.mkdir(parents=True, exist_ok=True)
                kept(work, commit, recipe).write_text(json.dumps(summary, indent=1) + "\n")
                print(commit, recipe, json.dumps(summary["metrics"]), flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--only-before", action="store_true", help="run the before side only (no table)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="keeps each run's metrics: rerun to continue")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="recipe stems, from: " + ", ".join(RECIPES))
    parser.add_argument("--out", type=Path, help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}: choose from {', '.join(RECIPES)}")
    before, after = commit_of(args.before), commit_of(args.after)
    run_side(before, recipes, args.work, args.data_dir.resolve())
    if args.only_before:
        return
    run_side(after, recipes, args.work, args.data_dir.resolve())
    rows = []
    for recipe in recipes:
        sides = {name: json.loads(kept(args.work, commit, recipe).read_text())
                 for name, commit in (("before", before), ("after", after))}
        rows.append({"recipe": recipe, "before": sides["before"], "after": sides["after"],
                     "identical": sides["before"] == sides["after"]})
    command = command_line(__file__)
    lines = [f"# Same results before ({before}) and after ({after})", "", f"Command: `{command}`  ",
             "One recipe per strategy family and per task kind, seed 0, each run in a fresh process with "
             "PEFTKIT_CPU_BF16=0; the overrides per recipe are `RECIPES` in the script. Identical means every "
             "metric and every logged training loss are equal.", "",
             "| recipe | metrics before | metrics after | final train loss before | after | identical |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        def shown(side: dict) -> str:
            return ", ".join(f"{k}={v:.6g}" for k, v in side["metrics"].items())

        def last_loss(side: dict) -> str:
            history = side["train_loss_history"]
            return f"{history[-1]['loss']:.6f}" if history else "-"

        lines.append(f"| {row['recipe']} | {shown(row['before'])} | {shown(row['after'])} | {last_loss(row['before'])} "
                     f"| {last_loss(row['after'])} | {'yes' if row['identical'] else 'NO'} |")
    if args.out:
        write_result(args.out, command, lines, rows)
    print("\n".join(lines))
    if not all(row["identical"] for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
