"""peftkit's defaults against the scripts a user would otherwise write, each in its own process.

    python benchmarks/speed.py --data-dir ../shared/data --out benchmarks/results/speed
    python benchmarks/speed.py --data-dir ../shared/data --out benchmarks/results/speed_bf16 \
        --sides tuned tuned-bf16 peftkit
    python benchmarks/speed.py --data-dir ../shared/data --profile --max-train-samples 480 \
        --models smollm2-135m --strategies lora --sides tuned-bf16 peftkit
    python benchmarks/speed.py --data-dir ../shared/data --out benchmarks/results/speed_seeds \
        --models minilm --strategies full --seeds 0 1 2

Per case (model, strategy, epochs, learning rate, seed; SST-2, the same examples, batch size,
LoRA targets and seed on every side), one fresh process per side, one after another (`--sides`;
by default plain, tuned and peftkit):

- plain: a Trainer + peft script as the Hugging Face examples write it: tokenize with
  truncation, `DataCollatorWithPadding`, random batches, Trainer's defaults (its fused AdamW
  among them), a frozen encoder recomputed every step for head-only training;
- tuned: the same script with the flag a careful user adds, batches grouped by length
  (`train_sampling_strategy="group_by_length"`), padded the same way;
- tuned-bf16 (only when named): the tuned script with `bf16=True` as well (and `use_cpu=True`,
  which Trainer asks for with it on a CPU): bf16 autocast over fp32 weights;
- peftkit: `peftkit.train` with its defaults and an empty feature cache (`PEFTKIT_CACHE`), so a
  linear probe's time includes computing its features (the `features` column says so), except
  `select: last`: like the scripts it trains on every example and keeps the final weights (its
  default holds 10% out to choose an epoch on, which is a protocol, not a speed, setting; as in
  `speed_sft.py`). Its
  default precision is the machine's native one: on a CPU with AVX512-BF16 or AMX, bf16 frozen
  weights and bf16 autocast (trainable weights in fp32), where plain and tuned keep Trainer's
  fp32 default (tuned-bf16 is the script that sets `bf16=True`).

Neither script imports peftkit: each runs with the allocator and thread settings a user's
process has. Reported: training samples/s and real (non-padding) tokens/s with evaluation
excluded, dev accuracy, peftkit's samples/s over each script's, and model-FLOPs utilisation
against this machine's measured matmul ceiling in the precision each side computes in. The
order of the sides alternates from case to case, so drift in the machine's speed does not
favour one side. One run's dev accuracy moves by several sentences with the seed (the head's
initialisation, the batch order, dropout): `--seeds` measures every case under each seed given
(default 0) and, where a case has more than one, the table ends with each side's mean accuracy
and the range of peftkit's ratios over them.

Resumable: each finished case is added to OUT.json with the commit it ran at (and the ceilings
measured before its invocation's first measured case); running the same command again skips the cases already
measured at this commit with the same sides and remeasures the rest, so the table can be made in pieces between
other work. OUT.md is written once every chosen case is in, all from one clean commit.

Model FLOPs per real token: a forward pass costs 2 per weight; backward costs 2 per weight
for the input gradients of every layer from the lowest one holding a trainable weight up, and
2 more per trainable weight for its gradient. So 6N for full training, about 4N for LoRA
(adapters in every layer), 2N + 4N_top for partial (only the top layers backpropagate) and 2N
for a linear probe's frozen forward; N counts non-embedding weights. A cached linear probe
does its 2N once, not once per epoch: its utilisation uses the work it did.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from harness import command_line, in_fresh_process, one_clean_commit, stamp, write_result

CASES = {
    "minilm": [("full", 2, 1e-4), ("lora", 2, 1e-3), ("partial", 2, 2e-4), ("linear-probe", 5, 1e-2)],
    "smollm2-135m": [("lora", 1, 5e-4), ("qlora", 1, 5e-4)],
}
SAMPLES = {"minilm": 8000, "smollm2-135m": 4000}  # as the comparison tables train them
BATCH = {"minilm": 32, "smollm2-135m": 16}
SIDES = ("plain", "tuned", "tuned-bf16", "peftkit")
DEFAULT_SIDES = ("plain", "tuned", "peftkit")
SCRIPT_PRECISION = {"plain": "fp32", "tuned": "fp32", "tuned-bf16": "bf16"}


def matmul_ceiling(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of a large square matmul in `dtype` on this machine."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return count * 2 * 2048**3 / (time.perf_counter() - start)


def script(case: dict, data_dir: str, side: str) -> dict:
    """The user's Trainer + peft script: plain, tuned with length-grouped batches, or tuned-bf16
    with Trainer's bf16 autocast as well."""
    import datasets
    import numpy as np
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    strategy, samples = case["strategy"], case["samples"]
    tokenizer = AutoTokenizer.from_pretrained(case["path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    files = {s: f"{data_dir}/sst2/{s}.jsonl" for s in ("train", "validation")}
    raw = datasets.load_dataset("json", data_files=files)
    raw["train"] = raw["train"].select(range(samples))
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True)
    encoded = encoded.rename_column("label", "labels").remove_columns(["sentence"])
    quant = None
    if strategy == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(case["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(case["path"], num_labels=2, quantization_config=quant,
                                                               pad_token_id=tokenizer.pad_token_id)
    if strategy in ("lora", "qlora"):
        if strategy == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=case["lora_targets"]))
    else:
        for name, param in model.named_parameters():
            param.requires_grad = strategy == "full" or name in case["trainable"]

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    bf16 = SCRIPT_PRECISION[side] == "bf16"
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(scratch, num_train_epochs=case["epochs"], learning_rate=case["lr"],
                                 per_device_train_batch_size=case["batch"], per_device_eval_batch_size=64,
                                 warmup_steps=0.06, weight_decay=0.01, eval_strategy="no", save_strategy="no",
                                 report_to="none", seed=case["seed"], disable_tqdm=True,
                                 bf16=bf16, use_cpu=bf16,  # Trainer refuses bf16 on a CPU without use_cpu
                                 train_sampling_strategy="random" if side == "plain" else "group_by_length")
        trainer = Trainer(model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
        train_time = trainer.train().metrics["train_runtime"]
        accuracy_now = trainer.evaluate()["eval_accuracy"]
    tokens = sum(len(x) for x in encoded["train"]["input_ids"]) * case["epochs"]
    return {"samples_per_s": samples * case["epochs"] / train_time, "tokens_per_s": tokens / train_time,
            "accuracy": accuracy_now, "train_time_s": train_time, "features": "recomputed every step",
            "precision": SCRIPT_PRECISION[side]}


def with_peftkit(case: dict, data_dir: str) -> dict:
    import peftkit

    with tempfile.TemporaryDirectory() as out:
        record = peftkit.train({
            "model": case["model"], "task": "sst2", "strategy": case["strategy"], "data_dir": data_dir,
            "max_train_samples": case["samples"], "epochs": case["epochs"], "learning_rate": case["lr"],
            "batch_size": case["batch"], "seed": case["seed"], "select": "last",
            "output_dir": f"{out}/run",
        }).record
    return {"samples_per_s": record.samples_per_s, "tokens_per_s": record.tokens_per_s,
            "accuracy": record.metrics["accuracy"], "train_time_s": record.train_time_s,
            "features": record.frozen_features or "not cached", "cached_features": record.cached_features,
            "precision": record.precision.compute}


def side_result(side: str, case: dict, data_dir: str, profile: bool = False) -> dict:
    """One side of a case, in this (fresh) process: `run_side`'s child."""
    quiet()
    if profile:
        profile_training()
    return with_peftkit(case, data_dir) if side == "peftkit" else script(case, data_dir, side)


def run_side(side: str, case: dict, data_dir: str, profile: bool = False) -> dict:
    """One side of a case in a fresh process with an empty peftkit cache, its output shown, its
    result read back."""
    with tempfile.TemporaryDirectory() as scratch:
        return in_fresh_process(side_result, side, case, data_dir, profile,
                                env={"PEFTKIT_CACHE": str(Path(scratch) / "cache")}, quiet=False)


def describe(model_name: str, strategy: str, epochs: int, lr: float) -> dict:
    """A case, with what both scripts need to know about the model without importing peftkit
    (its path, LoRA targets, the parameters partial and linear-probe train, chosen by peftkit's
    own strategy with its defaults) and its FLOPs per real token (module docstring)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from peftkit.anatomy import inspect_model
    from peftkit.models import resolve_model
    from peftkit.resolve import apply_strategy

    path = str(resolve_model(model_name).path)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=2))
    anatomy = inspect_model(model)
    trainable = []
    if strategy in ("partial", "linear-probe"):
        trainable = [n for n, p in apply_strategy(model, strategy, "sst2").named_parameters() if p.requires_grad]
    weights = {n: p.numel() for n, p in model.named_parameters() if n not in anatomy.embedding_params}
    total = sum(weights.values())
    backward_from = sum(weights.get(n, 0) for n in trainable)  # partial: the top layers, what sits above them, the head
    flops = {"full": 6 * total, "lora": 4 * total, "qlora": 4 * total, "partial": 2 * total + 4 * backward_from,
             "linear-probe": 2 * total}[strategy]
    return {"model": model_name, "strategy": strategy, "epochs": epochs, "lr": lr, "path": path,
            "samples": SAMPLES[model_name], "batch": BATCH[model_name], "flops_per_token": flops,
            "lora_targets": list(anatomy.layer_linear_suffixes), "trainable": trainable}


def profile_training() -> None:
    """Print torch.profiler's table of CPU operators over each Trainer.train call of this process
    (both scripts and peftkit train through Trainer): where a side's training time goes. The
    profiler slows what it watches, so a profiled run's speed is not a measurement."""
    import transformers
    from torch.profiler import ProfilerActivity, profile

    train = transformers.Trainer.train

    def profiled(self: transformers.Trainer, *args: object, **kwargs: object) -> object:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            output = train(self, *args, **kwargs)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        return output

    transformers.Trainer.train = profiled


def mfu(result: dict, case: dict, ceilings: dict[str, float]) -> float:
    flops = case["flops_per_token"]
    if result.get("cached_features"):  # one frozen forward over the data, then a head too small to count
        flops = flops / case["epochs"]
    return result["tokens_per_s"] * flops / ceilings[result["precision"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", nargs="+", default=list(CASES))
    parser.add_argument("--strategies", nargs="+", help="only these strategies (default: all of a model's cases)")
    parser.add_argument("--max-train-samples", type=int, help="fewer examples, for a quick check of the script")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="measure every case under each of these seeds, the same on every side (default: 0)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES),
                        help="the sides to measure; peftkit is always one (default: plain tuned peftkit)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of --out: print each side's profile of CPU operators over training, "
                             "nothing written (with --max-train-samples, e.g. 480: profiled speeds are not measurements)")
    args = parser.parse_args()
    quiet()
    if (args.out is None) == (not args.profile):
        parser.error("give --out (a measurement) or --profile (a look at where the time goes), not both")
    sides = tuple(s for s in SIDES if s in args.sides)
    if "peftkit" not in sides or len(sides) < 2:
        parser.error("--sides must name peftkit and at least one script, e.g. --sides tuned tuned-bf16 peftkit")
    cases = [{**describe(m, *c), "seed": seed} for m in args.models for c in CASES[m]
             if not args.strategies or c[0] in args.strategies for seed in args.seeds]
    for case in cases:
        case["samples"] = args.max_train_samples or case["samples"]
    if args.profile:  # a look at where the time goes: every side of every case, nothing measured or written
        for case in cases:
            for side in sides:
                run_side(side, case, args.data_dir, profile=True)
        return
    here = stamp()
    done = measured_rows(args.out.with_suffix(".json"), here["commit"], sides)
    ceilings: dict[str, float] = {}  # measured once, before the first case that is not resumed
    rows = []
    for number, case in enumerate(cases):
        key = case_key(case)
        if key in done:
            rows.append(done.pop(key))
            continue
        ceilings = ceilings or {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
        order = sides if number % 2 == 0 else sides[::-1]
        results = {side: run_side(side, case, args.data_dir) for side in order}
        row = {**{k: case[k] for k in KEY}, "sides": list(sides), "order": list(order), **here,
               "ceiling_flops": ceilings, **results,
               **{f"{side}_mfu": mfu(results[side], case, ceilings) for side in sides},
               **{f"vs_{side}": results["peftkit"]["samples_per_s"] / results[side]["samples_per_s"]
                  for side in sides if side != "peftkit"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_rows(args.out.with_suffix(".json"), rows + list(done.values()))
    save_rows(args.out.with_suffix(".json"), rows + list(done.values()))
    write(args.out, rows, sides)


KEY = ("model", "strategy", "epochs", "lr", "samples", "batch", "seed")


def case_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def measured_rows(path: Path, commit: str, sides: tuple[str, ...]) -> dict[tuple, dict]:
    """The cases OUT.json already holds from this commit (a clean tree) with these sides, by case;
    rows from other code or other sides, or from before rows named their commit, are measured again."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {case_key(r): r for r in rows
            if r.get("commit") == commit and r.get("dirty") is False and tuple(r.get("sides", DEFAULT_SIDES)) == sides}


def save_rows(path: Path, rows: list[dict]) -> None:
    write_result(path, command_line(__file__), data={"rows": rows})


def quiet() -> None:
    import logging

    import transformers

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()


def write(out: Path, rows: list[dict], sides: tuple[str, ...]) -> None:
    from importlib import metadata

    commit = one_clean_commit(rows, "run the same command again from a clean checkout")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes"))

    def spread(values: list[float]) -> str:
        low, high = min(values) / 1e9, max(values) / 1e9
        return f"{low:.1f}" if round(low, 1) == round(high, 1) else f"{low:.1f}-{high:.1f}"

    ceilings = {p: spread([r["ceiling_flops"][p] for r in rows]) for p in ("fp32", "bf16")}
    scripts = [s for s in sides if s != "peftkit"]
    names = " / ".join(sides)
    lines = [
        f"# Speed: peftkit's defaults vs a {' and a '.join(scripts)} Trainer + peft script "
        "(SST-2, each in its own process)", "",
        f"Command: `{command_line(__file__)}`", "",
        f"Commit {commit[:10]}; dates {', '.join(sorted({r['date'] for r in rows}))}; "
        f"machine: {', '.join(sorted({r['machine'] for r in rows}))}, {torch.get_num_threads()} threads; {versions}; "
        f"measured matmul ceiling fp32 {ceilings['fp32']} / bf16 {ceilings['bf16']} GFLOP/s "
        "(once per invocation, before its first measured case; a row's MFU uses its own)", "",
        "Samples/s over training only (evaluation excluded); acc: dev accuracy on the 872 validation sentences; "
        "MFU: model FLOPs (see the script's docstring) per second over the ceiling of the precision the side computes "
        "in (" + "; ".join(f"{s}: {SCRIPT_PRECISION[s]}" for s in scripts) + "; peftkit: its default, the machine's "
        "native precision, bf16 autocast on a CPU with AVX512-BF16 or AMX"
        + ("" if "tuned-bf16" in sides else "; a script would get it with `bf16=True`, which is not a baseline here")
        + "). Every side trains on the same examples and keeps its final weights: peftkit runs its defaults except "
        "`select: last` (its default protocol would hold 10% of them out to choose the epoch on).", "",
        f"| model | strategy | seed | examples x epochs | samples/s {names} | "
        + " | ".join(f"peftkit vs {s}" for s in scripts)
        + f" | acc {names} | MFU {names} | peftkit precision | peftkit features |",
        "|---|---|---|---|---|" + "---|" * len(scripts) + "---|---|---|---|",
    ]
    for r in rows:
        rate = " / ".join(f"{r[s]['samples_per_s']:.1f}" for s in sides)
        acc = " / ".join(f"{r[s]['accuracy']:.4f}" for s in sides)
        use = " / ".join(f"{100 * r[f'{s}_mfu']:.1f}%" for s in sides)
        ratios = " | ".join(f"**{r[f'vs_{s}']:.2f}x**" for s in scripts)
        lines.append(f"| {r['model']} | {r['strategy']} | {r['seed']} | {r['samples']} x {r['epochs']} | {rate} | {ratios} "
                     f"| {acc} | {use} | {r['peftkit']['precision']} | {r['peftkit']['features']} |")
    lines += seed_summary(rows, sides)
    write_result(out, command_line(__file__), lines)
    print("\n".join(lines))


def seed_summary(rows: list[dict], sides: tuple[str, ...]) -> list[str]:
    """One line per case measured under several seeds: each side's mean dev accuracy over them and
    the range of peftkit's speed ratios, the comparison one seed's accuracy is too noisy for."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEY if k != "seed"), []).append(r)
    lines = []
    for group in groups.values():
        if len(group) < 2:
            continue
        first = group[0]
        mean = " / ".join(f"{sum(r[s]['accuracy'] for r in group) / len(group):.4f}" for s in sides)
        ratios = "; ".join(f"{min(r[f'vs_{s}'] for r in group):.2f}-{max(r[f'vs_{s}'] for r in group):.2f}x the {s} script"
                           for s in sides if s != "peftkit")
        seeds = ", ".join(str(r["seed"]) for r in group)
        lines.append(f"\n{first['model']} {first['strategy']} over seeds {seeds}: mean dev accuracy "
                     f"{' / '.join(sides)} {mean}; peftkit {ratios}.")
    return lines


if __name__ == "__main__":
    main()
