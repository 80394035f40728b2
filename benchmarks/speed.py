"""peftkit against the script a user would otherwise write (plain Trainer + peft), side by side.

    python benchmarks/speed.py --data-dir ../shared/data --out benchmarks/results/speed

In one process, alternating, with the same model, data, batch size, epochs and learning rate:
(a) the baseline — tokenize with truncation, `DataCollatorWithPadding`, random batches,
Trainer defaults, a frozen encoder recomputed every step for head-only training — and
(b) `peftkit.train`. Reported per case: training samples/s and real (non-padding) tokens/s
with evaluation excluded, final dev accuracy, the ratio b/a, and the model-FLOPs utilisation
against this machine's measured fp32 matmul ceiling.

Model FLOPs per real token: 6N when every weight trains (forward 2N, input and weight
gradients 4N), 4N when the base is frozen (no weight gradients), 2N for a frozen forward
(head-only baseline); N counts the non-embedding parameters. peftkit's cached linear probe
does its 2N once, not once per epoch: its utilisation uses the work it actually did.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {
    "minilm": [("full", 2, 1e-4), ("lora", 2, 1e-3), ("partial", 2, 2e-4), ("linear-probe", 5, 1e-2)],
    "smollm2-135m": [("lora", 1, 5e-4), ("qlora", 1, 5e-4)],
}
SAMPLES = {"minilm": 8000, "smollm2-135m": 1000}
BATCH = {"minilm": 32, "smollm2-135m": 16}
FLOPS_PER_PARAM = {"full": 6, "partial": 6, "lora": 4, "qlora": 4, "linear-probe": 2}


def matmul_ceiling(seconds: float = 3.0) -> float:
    """Sustained fp32 FLOP/s of a large square matmul on this machine."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * 2048**3 / (time.perf_counter() - start)


def baseline(model_name: str, strategy: str, epochs: int, lr: float, data_dir: str) -> dict:
    """The plain Trainer + peft script, written the way the Hugging Face examples write it."""
    import datasets
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    from peftkit.anatomy import inspect_model
    from peftkit.models import resolve_model
    from peftkit.tasks.classification import compute_metrics

    path = resolve_model(model_name).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    files = {s: f"{data_dir}/sst2/{s}.jsonl" for s in ("train", "validation")}
    raw = datasets.load_dataset("json", data_files=files)
    raw["train"] = raw["train"].select(range(SAMPLES[model_name]))
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True)
    encoded = encoded.rename_column("label", "labels").remove_columns(["sentence"])
    quant = None
    if strategy == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                                                               quantization_config=quant)
    anatomy = inspect_model(model)
    if strategy in ("lora", "qlora"):
        if strategy == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=list(anatomy.layer_linear_suffixes)))
    elif strategy == "partial":
        for name, param in model.named_parameters():
            layer = anatomy.layer_index(name)
            param.requires_grad = anatomy.region(name) in ("head", "top") or (layer is not None and layer >= anatomy.num_layers - 2)  # peftkit partial's default: the top 2
    elif strategy == "linear-probe":
        for name, param in model.named_parameters():
            param.requires_grad = anatomy.is_head(name)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(scratch, num_train_epochs=epochs, learning_rate=lr,
                                 per_device_train_batch_size=BATCH[model_name], per_device_eval_batch_size=64,
                                 warmup_steps=0.06, weight_decay=0.01, eval_strategy="no", save_strategy="no",
                                 report_to="none", seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
        train_time = trainer.train().metrics["train_runtime"]
        accuracy = trainer.evaluate()["eval_accuracy"]
    tokens = sum(len(x) for x in encoded["train"]["input_ids"]) * epochs
    return {"samples_per_s": SAMPLES[model_name] * epochs / train_time, "tokens_per_s": tokens / train_time,
            "accuracy": accuracy, "train_time_s": train_time}


def with_peftkit(model_name: str, strategy: str, epochs: int, lr: float, data_dir: str) -> dict:
    import peftkit

    with tempfile.TemporaryDirectory() as out:
        record = peftkit.train({
            "model": model_name, "task": "sst2", "strategy": strategy, "data_dir": data_dir,
            "max_train_samples": SAMPLES[model_name], "epochs": epochs, "learning_rate": lr,
            "batch_size": BATCH[model_name], "output_dir": f"{out}/run",
        }).record
    return {"samples_per_s": record["samples_per_s"], "tokens_per_s": record["tokens_per_s"],
            "accuracy": record["metrics"]["accuracy"], "train_time_s": record["train_time_s"],
            "cached_features": record.get("cached_features", False)}


def non_embedding_params(model_name: str) -> int:
    from transformers import AutoConfig, AutoModel

    from peftkit.models import resolve_model

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(resolve_model(model_name).path))
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "wte" not in n)


def mfu(result: dict, strategy: str, params: int, ceiling: float, epochs: int, cached: bool) -> float:
    per_token = FLOPS_PER_PARAM[strategy] * params
    if cached:  # one frozen forward over the data, then a head too small to count
        per_token = 2 * params / epochs
    return result["tokens_per_s"] * per_token / ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=list(CASES))
    parser.add_argument("--strategies", nargs="+", help="only these strategies (default: all of a model's cases)")
    parser.add_argument("--max-train-samples", type=int, help="fewer examples, for a quick check of the script")
    args = parser.parse_args()
    if args.max_train_samples:
        SAMPLES.update({m: args.max_train_samples for m in SAMPLES})
    import logging

    import transformers

    from peftkit.allocator import set_mmap_threshold
    from peftkit.config import RunConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    # peftkit sets this allocator policy for its runs; set it first so the baseline runs under it too
    set_mmap_threshold(RunConfig.model_fields["cpu_mmap_threshold_kb"].default)
    ceiling = matmul_ceiling()
    rows = []
    for model_name in args.models:
        params = non_embedding_params(model_name)
        for strategy, epochs, lr in CASES[model_name]:
            if args.strategies and strategy not in args.strategies:
                continue
            base = baseline(model_name, strategy, epochs, lr, args.data_dir)
            ours = with_peftkit(model_name, strategy, epochs, lr, args.data_dir)
            row = {"model": model_name, "strategy": strategy, "epochs": epochs, "lr": lr, "baseline": base, "peftkit": ours,
                   "speedup": ours["samples_per_s"] / base["samples_per_s"],
                   "baseline_mfu": mfu(base, strategy, params, ceiling, epochs, False),
                   "peftkit_mfu": mfu(ours, strategy, params, ceiling, epochs, ours["cached_features"])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(args.out, rows, ceiling)


def write(out: Path, rows: list[dict], ceiling: float) -> None:
    from importlib import metadata

    command = "python " + shlex.join(sys.argv)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes"))
    lines = [
        "# Speed: peftkit vs a plain Trainer + peft script (SST-2, same process, alternating)", "",
        f"Command: `{command}`", "",
        f"Date: {dt.date.today().isoformat()}; machine: {platform.platform()}, {torch.get_num_threads()} threads; {versions}; "
        f"measured fp32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s", "",
        "| model | strategy | epochs | baseline samples/s | peftkit samples/s | speed-up | baseline tokens/s | peftkit tokens/s "
        "| baseline acc | peftkit acc | baseline MFU | peftkit MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, p = r["baseline"], r["peftkit"]
        lines.append(f"| {r['model']} | {r['strategy']} | {r['epochs']} | {b['samples_per_s']:.1f} | {p['samples_per_s']:.1f} | "
                     f"**{r['speedup']:.2f}x** | {b['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | {b['accuracy']:.4f} | "
                     f"{p['accuracy']:.4f} | {100 * r['baseline_mfu']:.1f}% | {100 * r['peftkit_mfu']:.1f}% |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "ceiling_flops": ceiling, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
