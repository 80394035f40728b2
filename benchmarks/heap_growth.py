"""Why CPU peak memory drifts above the estimate: the C allocator, measured.

    python benchmarks/heap_growth.py --data-dir ../shared/data --out benchmarks/results/heap_growth

For each strategy, glibc mmap threshold (`cpu_mmap_threshold_kb`: 0, glibc's own sliding
policy, is `peftkit train`'s default; 1024 KB is what `peftkit compare` fixes for the peaks it
publishes; 4096 and 16384 KB look for a setting both fast and tight) and batch shape, a fresh process
loads the packaged MiniLM, applies the strategy and trains `--steps` AdamW steps on SST-2
batches of 32 in shuffled order, the longest first: either padded to their own longest
sentence ("varying", as `peftkit train` pads) or every batch padded to the same 64 tokens
("fixed"). It records the peak resident memory above the size before the model loaded
(peftkit's CPU measure) after the first `--warmup` steps and at the end, and seconds per step
after warm-up.

Since the longest batch runs during warm-up, no later step needs a larger tensor: whatever
the peak gains after warm-up is memory the allocator holds, not memory a tensor uses, and
part of the gap between `peftkit estimate` (tensors) and the measured peak. Children run one
after another in one invocation, every setting `--rounds` times in alternating order (the
table gives medians, and each round's seconds per step), so the seconds per step compare as
ratios within one results file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from harness import FreshProcessError, command_line, in_fresh_process, write_result

MB = 2**20
THRESHOLDS_KB = (1024, 4096, 16384, 0)
SHAPES = ("varying", "fixed")
FIXED_LENGTH = 64
BATCH = 32


def batches(data_dir: Path, tokenizer, shape: str, steps: int, seed: int = 0) -> list[dict]:
    """`steps` tokenized SST-2 training batches in a seeded shuffled order, the longest first, so
    the peak after warm-up already holds the largest activations any later step needs."""
    import torch

    rows = [json.loads(line) for line in (data_dir / "sst2" / "train.jsonl").open()][: steps * BATCH]
    random.Random(seed).shuffle(rows)
    padding = "max_length" if shape == "fixed" else True
    out = []
    for i in range(steps):
        chunk = rows[i * BATCH:(i + 1) * BATCH]
        encoded = tokenizer([r["sentence"] for r in chunk], truncation=True, max_length=FIXED_LENGTH,
                            return_tensors="pt", padding=padding)
        out.append({**encoded, "labels": torch.tensor([r["label"] for r in chunk])})
    longest = max(range(steps), key=lambda i: out[i]["input_ids"].shape[1])
    return [out[longest], *out[:longest], *out[longest + 1:]]  # the largest activations come first, in warm-up


def child(strategy_name: str, threshold_kb: int, shape: str, steps: int, warmup: int, data_dir: Path) -> dict:
    """One training process (a fresh one: `in_fresh_process`): load, adapt, train; peak memory
    after warm-up and at the end."""
    import torch

    from peftkit.cpu.allocator import set_mmap_threshold
    from peftkit.measure import PeakMemory
    from peftkit.models import load_for_classification, load_tokenizer, resolve_model
    from peftkit.strategies import build_strategy

    set_mmap_threshold(threshold_kb)
    torch.manual_seed(0)
    source = resolve_model("minilm")
    tokenizer = load_tokenizer(source)
    data = batches(data_dir, tokenizer, shape, steps)
    peak = PeakMemory().start()
    strategy = build_strategy(strategy_name, {})
    model = strategy.apply(load_for_classification(source, ["negative", "positive"], tokenizer,
                                                   strategy.quantization_config(torch.float32)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    warm_peak, start = 0, 0.0
    for step, batch in enumerate(data):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == warmup:
            warm_peak, start = peak.stop()["peak_memory_bytes"], time.perf_counter()
    return {"strategy": strategy_name, "threshold_kb": threshold_kb, "shape": shape,
            "peak_after_warmup_mb": warm_peak / MB, "peak_at_end_mb": peak.stop()["peak_memory_bytes"] / MB,
            "seconds_per_step": (time.perf_counter() - start) / (steps - warmup)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heap_growth"))
    parser.add_argument("--strategies", default="lora")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every setting, in alternating order (medians)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not 0 < args.warmup < args.steps:
        parser.error(f"--warmup must lie between 0 and --steps ({args.steps}), got {args.warmup}")
    configs = [(strategy, shape, threshold) for strategy in args.strategies.split(",") for shape in SHAPES
               for threshold in THRESHOLDS_KB]
    runs: dict[tuple, list[dict]] = {config: [] for config in configs}
    for round_index in range(args.rounds):  # alternate the order, so a slow spell of the machine hits every setting
        for strategy, shape, threshold in configs if round_index % 2 == 0 else configs[::-1]:
            try:
                found = in_fresh_process(child, strategy, threshold, shape, args.steps, args.warmup, args.data_dir)
            except FreshProcessError as error:
                sys.exit(f"error: {strategy}, {threshold} KB, {shape} batches failed: {error.last_line}")
            runs[(strategy, shape, threshold)].append(found)
            print(runs[(strategy, shape, threshold)][-1], flush=True)
    rows = [{**found[0], "peak_after_warmup_mb": statistics.median(r["peak_after_warmup_mb"] for r in found),
             "peak_at_end_mb": statistics.median(r["peak_at_end_mb"] for r in found),
             "seconds_per_step": statistics.median(r["seconds_per_step"] for r in found),
             "seconds_per_step_each": [r["seconds_per_step"] for r in found]} for found in runs.values()]
    write(args.out, rows, args.steps, args.warmup)


def write(out: Path, rows: list[dict], steps: int, warmup: int) -> None:
    import torch
    import transformers

    command = command_line(__file__)
    lines = [
        "# Heap growth: CPU peak memory vs the C allocator's mmap threshold (MiniLM, SST-2 batches of 32)", "",
        f"Command: `{command}`", "",
        f"Date: {dt.date.today()}; machine: {platform.platform()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}", "",
        f"Peak = VmHWM above the resident size before the model loaded. Growth = peak after {steps} steps minus "
        f"peak after {warmup}. Threshold 0 = glibc's own sliding policy, `peftkit train`'s default; 1024 KB is what `peftkit compare` "
        "fixes. Medians over the rounds.", "",
        "| strategy | batch lengths | mmap threshold | peak after warm-up MB | peak at end MB | growth MB | s/step | s/step, each round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threshold = f"{r['threshold_kb']} KB" if r["threshold_kb"] else "glibc default"
        lines.append(f"| {r['strategy']} | {r['shape']} | {threshold} | {r['peak_after_warmup_mb']:.0f} | "
                     f"{r['peak_at_end_mb']:.0f} | {r['peak_at_end_mb'] - r['peak_after_warmup_mb']:+.0f} | "
                     f"{r['seconds_per_step']:.3f} | {', '.join(f'{x:.3f}' for x in r['seconds_per_step_each'])} |")
    write_result(out, command, lines, {"rows": rows})


if __name__ == "__main__":
    main()
