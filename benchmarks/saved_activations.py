"""The estimate's activation term against what autograd keeps, on the packaged models, in the
precision a run computes in on this CPU.

    python benchmarks/saved_activations.py --out benchmarks/results/saved_activations_bf16

For each (model, strategy): the model as a run builds it (bf16 base, trained tensors in fp32,
adapters taking their input as autocast gives it, attention switched as `attn_implementation:
auto` switches it), one training forward of BATCH x LENGTH random tokens under bf16 autocast,
and the bytes autograd keeps for backward (`peftkit.measure.saved_for_backward`) against
`peftkit estimate`'s activation term for the same batch. A check of one term, without the
allocator, the optimizer or evaluation; the whole-run peaks are in estimate_check.md (fp32).
`--precision fp32` measures fp32 instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import command_line, one_clean_commit, stamp, write_result

MODELS = {"minilm": ("full", "partial", "lora", "bitfit", "dora", "ia3", "adapter", "prompt-tuning"),
          "smollm2-135m": ("full", "partial", "lora", "dora", "ia3", "adapter", "prompt-tuning")}
BATCH, LENGTH = 8, 32


def measure(model: str, strategy: str, precision: str) -> dict:
    """One case: the measured bytes, the estimate and their ratio."""
    from peftkit.cpu.attention import use_fp32_cpu_attention
    from peftkit.memory.estimate import estimate
    from peftkit.measure import saved_for_backward
    from peftkit.models import load_for_classification, load_model_config, load_tokenizer, ready_for_training, resolve_model
    from peftkit.strategies import build_strategy

    half = precision == "bf16"
    built = build_strategy(strategy)
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    built.prepare_tokenizer(tokenizer, load_model_config(source))
    torch.manual_seed(0)
    base = load_for_classification(source, ["a", "b"], tokenizer, built.quantization_config(torch.bfloat16),
                                   dtype=torch.bfloat16 if half else torch.float32)
    net = ready_for_training(built.apply(base), half).train()
    if half:
        use_fp32_cpu_attention(net)
    ids = torch.randint(10, 200, (BATCH, LENGTH))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        measured = saved_for_backward(net, lambda: net(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       labels=torch.zeros(BATCH, dtype=torch.long)))
    estimated = estimate(model, built, batch_size=BATCH, seq_len=LENGTH, dtype=precision, device="cpu").terms["activations"]
    return {"model": model, "strategy": strategy, "measured_bytes": measured, "estimated_bytes": estimated,
            "ratio": estimated / measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one forward each: no timing, only bytes
    here = stamp()
    rows = [{**measure(model, strategy, args.precision), **here} for model, strategies in MODELS.items()
            for strategy in strategies]
    commit = one_clean_commit(rows, "commit, then run it again")
    command = command_line(__file__)
    lines = [f"# Activations estimated against saved for backward ({args.precision}, CPU)", "",
             f"`{command}` at {commit[:7]}, {here['date']}, {here['machine']}.", "",
             f"One training forward of {BATCH} x {LENGTH} tokens; MB = 2^20 bytes.", "",
             "| model | strategy | measured MB | estimated MB | estimated / measured |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['strategy']} | {r['measured_bytes'] / 2**20:.1f} | {r['estimated_bytes'] / 2**20:.1f} "
              f"| {r['ratio']:.2f} |" for r in rows]
    write_result(args.out, command, lines, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
