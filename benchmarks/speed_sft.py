"""Instruction tuning speed: peftkit against the TRL script a user would otherwise write.

    python benchmarks/speed_sft.py --data-dir ../shared/data --out benchmarks/results/speed_sft

The baseline is `trl.SFTTrainer(model=..., peft_config=LoraConfig(...))` written as TRL's
documentation writes it: the conversations as prompt/completion pairs (so the loss falls on
the answers only, as in peftkit), fp32 (`bf16=False`: TRL's default bf16 refuses to start on
a CPU), TRL's own defaults otherwise, gradient checkpointing included. peftkit runs its defaults:
the machine's native precision (on a CPU with AVX512-BF16 or AMX, bf16 frozen weights under bf16
autocast, LoRA weights in fp32), which the precision column shows.
The tuned baseline also turns gradient checkpointing off, as a careful user of a small model
would. All sides train
SmolLM2-135M-Instruct with the same LoRA (r 8, alpha 16, dropout 0.05, every linear
projection), data (the first N sst2-chat examples), epochs, batch size, learning rate,
schedule and seed, and report the loss on the same validation examples' answers. Each run is
its own fresh process, with the allocator and thread settings of a plain Python process;
baseline and peftkit alternate, `--rounds` times. Reported: training samples/s and tokens/s
(the examples' tokens under the model's chat template, evaluation excluded), validation loss,
and the median ratio peftkit / baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from harness import FreshProcessError, command_line, in_fresh_process, write_result

MODEL = "smollm2-135m"
SIDES = ("baseline", "tuned-baseline", "peftkit")
SETTINGS = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-4, "warmup_ratio": 0.06, "seed": 0}


def baseline(data_dir: str, samples: int, eval_samples: int, tuned: bool = False) -> dict:
    """The plain TRL script, in this (fresh) process; `tuned` turns gradient checkpointing off."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peftkit.models import resolve_model

    path = resolve_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    files = {s: f"{data_dir}/sst2-chat/{s}.jsonl" for s in ("train", "validation")}
    raw = datasets.load_dataset("json", data_files=files)
    pairs = raw.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                    remove_columns=["messages"])
    train, validation = pairs["train"].select(range(samples)), pairs["validation"].select(range(eval_samples))
    model = AutoModelForCausalLM.from_pretrained(path)
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(scratch, num_train_epochs=SETTINGS["epochs"], per_device_train_batch_size=SETTINGS["batch_size"],
                         learning_rate=SETTINGS["learning_rate"], warmup_steps=SETTINGS["warmup_ratio"],
                         lr_scheduler_type="linear", seed=SETTINGS["seed"], save_strategy="no", report_to="none",
                         disable_tqdm=True, bf16=False, **({"gradient_checkpointing": False} if tuned else {}))
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start
        loss = trainer.evaluate()["eval_loss"]
    return {"train_time_s": train_time, "samples": samples, "validation_loss": loss, "precision": "fp32"}


def with_peftkit(data_dir: str, samples: int, eval_samples: int) -> dict:
    """`peftkit.train` with its defaults for the same settings, in this (fresh) process; select=last,
    so that it trains on the same examples as the baseline (no selection slice held out)."""
    import peftkit

    with tempfile.TemporaryDirectory() as out:
        record = peftkit.train({
            "model": MODEL, "task": "sst2-chat", "strategy": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
            "data_dir": data_dir, "max_train_samples": samples, "max_eval_samples": eval_samples,
            "select": "last", "max_generate_samples": 0, "output_dir": f"{out}/run", **SETTINGS,
        }).record
    return {"train_time_s": record.train_time_s, "samples": record.data["train_examples"],
            "validation_loss": record.metrics["loss"], "precision": record.precision.compute}


def chat_tokens(data_dir: str, samples: int) -> int:
    """Tokens of the first `samples` training conversations under the model's chat template."""
    from peftkit.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(MODEL))
    rows = Path(data_dir, "sst2-chat", "train.jsonl").read_text().splitlines()[:samples]
    texts = [tokenizer.apply_chat_template(json.loads(r)["messages"], tokenize=False) for r in rows]
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def side_result(side: str, data_dir: str, samples: int, eval_samples: int) -> dict:
    """One run of one side, in this (fresh) process: `run_side`'s child."""
    import logging

    import transformers

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    if side == "peftkit":
        return with_peftkit(data_dir, samples, eval_samples)
    return baseline(data_dir, samples, eval_samples, tuned=side == "tuned-baseline")


def run_side(side: str, args: argparse.Namespace) -> dict:
    """One side in a fresh process, its result read back."""
    try:
        return in_fresh_process(side_result, side, args.data_dir, args.samples, args.eval_samples)
    except FreshProcessError as error:
        raise SystemExit(f"{side} failed: {error.last_line}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.out is None:
        parser.error("--out is required")
    tokens = chat_tokens(args.data_dir, args.samples)
    rounds = []
    try:
        for index in range(args.rounds):
            result = {side: run_side(side, args) for side in SIDES}
            for side in result.values():
                side["samples_per_s"] = side["samples"] * SETTINGS["epochs"] / side["train_time_s"]
                side["tokens_per_s"] = tokens * side["samples"] / args.samples * SETTINGS["epochs"] / side["train_time_s"]
            result["speedup"] = result["peftkit"]["samples_per_s"] / result["baseline"]["samples_per_s"]
            result["speedup_tuned"] = result["peftkit"]["samples_per_s"] / result["tuned-baseline"]["samples_per_s"]
            rounds.append(result)
            print(json.dumps({"round": index, **result}), flush=True)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: nothing written")
    write(args, rounds, tokens)


def write(args: argparse.Namespace, rounds: list[dict], tokens: int) -> None:
    from importlib import metadata

    command = command_line(__file__)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "trl"))
    lines = ["# Instruction-tuning speed: peftkit vs a plain TRL SFTTrainer + LoRA script", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}; {versions}  ",
             f"SmolLM2-135M-Instruct, LoRA r 8 on every projection, first {args.samples} sst2-chat examples "
             f"({tokens} tokens under the chat template), {SETTINGS}; validation loss on the answers of the first "
             f"{args.eval_samples} validation examples. Each run in its own process, alternating.", "",
             "| round | side | precision | samples/s | tokens/s | train s | validation loss | peftkit speed-up over it |",
             "|---|---|---|---|---|---|---|---|"]
    for index, r in enumerate(rounds):
        for side in SIDES:
            s = r[side]
            ratio = {"baseline": f"{r['speedup']:.2f}x", "tuned-baseline": f"{r['speedup_tuned']:.2f}x"}.get(side, "")
            lines.append(f"| {index} | {side} | {s['precision']} | {s['samples_per_s']:.2f} | {s['tokens_per_s']:.0f} | {s['train_time_s']:.0f} | "
                         f"{s['validation_loss']:.4f} | {ratio} |")
    lines += ["", f"Median speed-up over the plain script: **{statistics.median(r['speedup'] for r in rounds):.2f}x**; "
              f"over the tuned one: **{statistics.median(r['speedup_tuned'] for r in rounds):.2f}x**"]
    write_result(args.out, command, lines, {"tokens": tokens, "rounds": rounds})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
