"""The estimate's `evaluation` term against the memory a forward pass without gradients really
takes, strategy by strategy.

    python benchmarks/evaluation_peak.py --out benchmarks/results/evaluation_peak

A comparison's per-epoch evaluation runs in batches larger than training's (256 by default),
so on small models its no-gradient forward often sets the run's peak: what one layer holds at
once, which depends on how the strategy's modules compute (an unmerged LoRA update of the
feed-forward's up projection is one more feed-forward-wide tensor beside the base output).
For each (model, strategy), a fresh process loads the packaged model as a two-label sequence
classifier in fp32, applies the strategy, runs one small warm-up forward, resets the
high-water mark, and runs one no-gradient forward of `batch` x `length` random tokens, under
the allocator policy `peftkit compare` publishes peaks with (mmap threshold 1 MB, so every
activation of these sizes is its own mapping, returned when freed). Measured = VmHWM growth
over that forward; estimate = `peftkit estimate`'s evaluation term for the same batch.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

from harness import FreshProcessError, command_line, in_fresh_process, one_clean_commit, stamp, write_result

MB = 2**20
# (model, batch, length): MiniLM at the comparison's evaluation batch, SmolLM2 at half of it
MODELS = (("minilm", 256, 128), ("smollm2-135m", 128, 128))
STRATEGIES = ("full", "bitfit", "lora", "qlora", "dora", "peft:loha", "peft:lokr", "ia3", "adapter", "prompt-tuning",
              "prefix-tuning")
NO_BIASES = {"smollm2-135m": {"bitfit"}}  # Llama has no biases: bitfit refuses it


def measure_one(model: str, strategy: str, batch: int, length: int) -> dict:
    """In this process (a fresh one: `in_fresh_process`): the no-gradient forward's high-water
    growth and the estimate's term."""
    import gc

    import torch

    from peftkit.cpu.allocator import set_mmap_threshold
    from peftkit.memory.estimate import estimate
    from peftkit.measure import PeakMemory
    from peftkit.models import load_for_classification, load_model_config, load_tokenizer, resolve_model
    from peftkit.strategies import build_strategy

    set_mmap_threshold(1024)
    torch.set_num_threads(1)
    built = build_strategy(strategy, {})
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    built.prepare_tokenizer(tokenizer, load_model_config(source))
    net = built.apply(load_for_classification(source, ["a", "b"], tokenizer,
                                              built.quantization_config(torch.float32))).eval()
    with torch.no_grad():
        warm = torch.randint(10, 200, (2, length))
        net(input_ids=warm, attention_mask=torch.ones_like(warm))
        gc.collect()
        memory = PeakMemory("cpu").start()  # peftkit's CPU measure: VmHWM reset to the resident size, and its growth
        ids = torch.randint(10, 200, (batch, length))
        net(input_ids=ids, attention_mask=torch.ones_like(ids))
        measured = memory.stop()["peak_memory_bytes"]
    counted = estimate(model, built, batch_size=2, seq_len=length, dtype="fp32", device="cpu",
                       eval_batch_size=batch).terms["evaluation"]
    version = stamp()
    return {"model": model, "strategy": strategy, "batch": batch, "length": length, "measured_bytes": measured,
            "estimate_bytes": counted, "ratio": counted / measured, "commit": version["commit"],
            "dirty": version["dirty"]}


def write(out: Path, rows: list[dict], command: str) -> None:
    import torch

    commit = one_clean_commit(rows, "commit first, then run again")
    ratios = [r["ratio"] for r in rows]
    lines = [
        "# The evaluation term: estimate vs a no-gradient forward's measured peak", "",
        f"Command: `{command}`", "",
        f"Date: {date.today()}; commit {commit[:10]}; machine: {platform.platform()}, CPU, 1 thread, "
        f"torch {torch.__version__}", "",
        "Each row: a fresh process, the packaged model as a two-label classifier in fp32 with the strategy applied, "
        "one no-gradient forward of batch x length random tokens after a small warm-up; measured = VmHWM growth over "
        "that forward (mmap threshold 1 MB, as `peftkit compare` publishes peaks); estimate = `peftkit estimate`'s "
        "`evaluation` term. Values per token = bytes / (batch x length x 4).", "",
        f"{len(rows)} rows; estimate / measured {min(ratios):.2f} to {max(ratios):.2f}.", "",
        "| model | strategy | batch x length | measured MB | estimate MB | measured values/token | "
        "estimated values/token | estimate / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = 4 * r["batch"] * r["length"]
        lines.append(f"| {r['model']} | {r['strategy']} | {r['batch']} x {r['length']} | {r['measured_bytes'] / MB:.0f} | "
                     f"{r['estimate_bytes'] / MB:.0f} | {r['measured_bytes'] / per:.0f} | {r['estimate_bytes'] / per:.0f} | "
                     f"{r['ratio']:.2f} |")
    write_result(out, command, lines, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation_peak"))
    args = parser.parse_args()
    rows = []
    for model, batch, length in MODELS:
        for strategy in STRATEGIES:
            if strategy in NO_BIASES.get(model, ()):
                continue
            try:
                rows.append(in_fresh_process(measure_one, model, strategy, batch, length))
            except FreshProcessError as error:
                sys.exit(f"error: {model} {strategy} failed: {error.last_line}")
            print(f"{model} {strategy}: {rows[-1]['ratio']:.3f}", flush=True)
    write(args.out, rows, command_line(__file__))


if __name__ == "__main__":
    main()
