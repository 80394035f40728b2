"""GPU check: step time, tokens/s and peak CUDA memory (allocated and reserved) of peftkit's
strategies on randomly initialised Llama-3.2-1B- and Llama-3.1-8B-shaped models, beside what
`peftkit estimate` predicts for the same settings, as a Markdown table. No downloads: the
weights are random, saved once to a scratch checkpoint, and loaded through peftkit's own path
(4-bit for qlora), then trained by peftkit's SFT trainer (TRL) on fixed-length random rows.

    python benchmarks/gpu/check.py --out benchmarks/results/gpu/CARD.md   # one GPU, under 8 minutes (and CARD.json)
    python benchmarks/gpu/check.py --smoke                               # CPU, a tiny config (the tests run it)

On a GPU each cell runs in its own process, so one cell's memory never shows in another's
peak (the CPU smoke run keeps them in one process: it checks the path, not the numbers). A
cell whose estimate exceeds the device's memory is reported as skipped, not attempted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness beside the other benchmark scripts
from harness import FreshProcessError, command_line, in_fresh_process, write_result  # noqa: E402
STRATEGIES = ("full", "lora", "qlora", "dora", "adapter", "prompt-tuning")
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 0,
}
LLAMA_3_1_8B = {**json.loads((ROOT / "tests" / "configs" / "llama-3.1-8b.json").read_text()), "pad_token_id": 0}
TINY = {**LLAMA_3_2_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 30522}
GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny Llama config, 2 steps per cell")
    parser.add_argument("--out", type=Path, help="write the table to OUT.md (and its rows to OUT.json) too")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps, after 2 warm-up steps")
    args = parser.parse_args()
    settings = {"device": "cpu" if args.smoke else "cuda", "batch_size": args.batch_size or 2,
                "seq_len": args.seq_len or (32 if args.smoke else 1024), "steps": args.steps or (2 if args.smoke else 5)}
    shapes = {"tiny-llama": TINY} if args.smoke else {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B}
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftkit-gpu-check-") as scratch:
        for shape, config in shapes.items():
            checkpoint = save_random_checkpoint(config, Path(scratch) / shape, settings["device"])
            for strategy in STRATEGIES:
                cell = measure(checkpoint, strategy, settings) if args.smoke else run_cell(checkpoint, strategy, settings)
                rows.append({"shape": shape, "strategy": strategy, **cell})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    command = command_line(__file__)
    table = markdown(rows, settings, command)
    print(table)
    if args.out:
        write_result(args.out, command, table, {"settings": settings, "rows": rows})


def save_random_checkpoint(config: dict, directory: Path, device: str) -> Path:
    """A randomly initialised model of this shape, saved in bf16 (fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    model.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def run_cell(checkpoint: Path, strategy: str, settings: dict) -> dict:
    """One (shape, strategy) in a fresh process: its measurements, or why it has none."""
    try:
        return in_fresh_process(measure, checkpoint, strategy, settings)
    except FreshProcessError as error:
        return {"status": f"failed: {error.last_line[:120]}"}


def measure(checkpoint: Path, strategy_name: str, settings: dict) -> dict:
    """Train `steps` steps (after 2 warm-up steps) of batch x seq_len random tokens through
    peftkit's SFT trainer, and report step time, tokens/s and peak memory beside the estimate."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from peftkit.resolve import make_config
    from peftkit.memory.estimate import estimate_run
    from peftkit.measure import PeakMemory
    from peftkit.models import load_causal_lm, load_tokenizer, ready_for_training, resolve_model
    from peftkit.loading import base_quantization, weight_options
    from peftkit.tasks.sft import _sft_trainer
    from peftkit.trainer import build_optimizer

    device, batch, length, steps = settings["device"], settings["batch_size"], settings["seq_len"], settings["steps"]
    config = make_config({
        "model": str(checkpoint), "task": "sft", "strategy": strategy_name, "batch_size": batch, "max_length": length,
        "dtype": "bf16" if device == "cuda" else "fp32", "gradient_checkpointing": device == "cuda",
        "select": "last", "epochs": 1, "warmup_ratio": 0.0, "group_by_length": False, "eval_batch_size": batch,
        "output_dir": str(checkpoint.parent / "unused"),
    })
    strategy, task = config.build_strategy(), config.task_kind
    shape = {"data": {"longest_train_example": length, "longest_validation_example": length}}
    predicted = estimate_run(config, shape, device)
    capacity = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    result = {"estimate_gib": predicted.total_bytes / GiB, "trainable": predicted.trainable_params}
    if capacity is not None and predicted.total_bytes > capacity:
        return {**result, "status": f"skipped: estimate {predicted.total_bytes / GiB:.1f} GiB > {capacity / GiB:.0f} GiB"}

    tokenizer = load_tokenizer(resolve_model("tiny-llama"))  # any tokenizer with a pad token: the rows are token ids
    memory = PeakMemory(device).start()
    model = load_causal_lm(resolve_model(str(checkpoint)), tokenizer, base_quantization(config, strategy),
                           **weight_options(config))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = ready_for_training(strategy.apply(model, task), half_precision=config.compute_precision(device) != "fp32")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, ((steps + 2) * batch, length), generator=generator).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, *args, **kwargs) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = StepTimes()
    with tempfile.TemporaryDirectory(prefix="peftkit-gpu-cell-") as scratch:
        optimizer = build_optimizer(config.optimizer, strategy.param_groups(model, config.lr, config.weight_decay))
        trainer = _sft_trainer(model, config, tokenizer, scratch, train=data, evaluation=None,
                               optimizers=(optimizer, None), callbacks=[timer])
        trainer.args.max_steps = steps + 2
        trainer.train()
    peak = memory.stop()
    step_s = (timer.times[-1] - timer.times[1]) / steps
    return {**result, "status": "ok", "step_s": step_s, "tokens_per_s": batch * length / step_s,
            "peak_allocated_gib": peak["peak_memory_bytes"] / GiB,
            "peak_reserved_gib": peak.get("peak_memory_reserved_bytes", 0) / GiB or None}


def markdown(rows: list[dict], settings: dict, command: str) -> str:
    """The table: one row per (shape, strategy), estimate/measured on the allocated peak."""
    import torch

    card = torch.cuda.get_device_name() if settings["device"] == "cuda" else "CPU (smoke run)"
    lines = [f"# GPU check: {card}", "",
             f"Command: `{command}`. Random weights, batch {settings['batch_size']} x {settings['seq_len']} tokens, "
             f"{settings['steps']} measured steps after 2 warm-up steps, peftkit's SFT trainer, "
             f"{'bf16 weights and compute, gradient checkpointing' if settings['device'] == 'cuda' else 'fp32'}.", "",
             "| shape | strategy | trainable | step s | tokens/s | peak allocated GiB | peak reserved GiB | estimate GiB | estimate/measured | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ok = row.get("status") == "ok"

        def cell(key: str, digits: int) -> str:
            value = row.get(key)
            return f"{value:,.{digits}f}" if ok and value is not None else ""

        ratio = f"{row['estimate_gib'] / row['peak_allocated_gib']:.2f}" if ok and row.get("peak_allocated_gib") else ""
        lines.append(f"| {row['shape']} | {row['strategy']} | {row.get('trainable', 0):,} | {cell('step_s', 3)} | "
                     f"{cell('tokens_per_s', 0)} | {cell('peak_allocated_gib', 2)} | {cell('peak_reserved_gib', 2)} | "
                     f"{row.get('estimate_gib', 0):.2f} | {ratio} | {row['status']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
