"""The `peftkit` command line: train, eval, predict, generate, merge, strategies, compare,
report, estimate.

A run option's flag is generated from its schema (`peftkit.flags`): a recipe gives the
starting values, flags override it and `--set key=value` overrides both. User errors print
one line and exit with code 2.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from peftkit.checkpoints import checkpoint_root, complete_checkpoints
from peftkit.data import split_files
from peftkit.errors import PeftkitError
from peftkit.flags import NO_DEFAULT, SCHEMA_DEFAULT, check_values, option_fields, with_options
from peftkit.memory.meta import load_config
from peftkit.preflight import check_against_model, check_device
from peftkit.record import read_record
from peftkit.strategies import STRATEGIES, build_strategy, load_peft_registry
from peftkit.tasks import DATASETS, TASKS, headline_metric, resolve_task

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional hub kernel is missing.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Fine-tune pretrained Transformers with any strategy behind one interface.",
)


def _print_version(value: bool) -> None:
    if value:
        from peftkit import __version__

        typer.echo(f"peftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print peftkit's version and exit.")) -> None:
    """Fine-tune pretrained Transformers with any strategy behind one interface."""


def user_errors(command: Callable) -> Callable:
    """Turn a PeftkitError into `error: ...` on stderr and exit code 2, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PeftkitError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    """Keep the terminal for peftkit's own lines and the training progress bar: no per-map
    progress bars from datasets. Library warnings still show, except the few that say
    nothing to a user (peftkit.library_noise)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()


@app.command()
@user_errors
@with_options(extra_help={"task": f" Built-in: {', '.join(DATASETS)}; kinds: {', '.join(TASKS)}."})
def train(
    options: dict[str, Any],
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; flags and --set override it."),
    set_: list[str] = typer.Option([], "--set", help="key=value override, e.g. --set r=16 or --set epochs=2."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and its memory estimate; load nothing, train nothing."),
    device: str = typer.Option("cuda", help="--dry-run: the device to estimate for (cuda or cpu)."),
) -> None:
    """Fine-tune one model with one strategy on one task. Every option below is a recipe key
    too; a strategy's own options (r, alpha, ...) go through --set or the recipe."""
    from peftkit.recipes import apply_overrides, load_recipe
    from peftkit.resolve import make_config

    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    current = values.get("strategy")
    strategy = options.get("strategy")
    if strategy is not None and strategy != (current.get("name") if isinstance(current, dict) else current):
        values["strategy"] = strategy  # another strategy: the recipe's options do not carry over
    values.update({k: v for k, v in options.items() if k != "strategy"})
    values = apply_overrides(values, set_)
    config = make_config(values)  # a typo'd option answers first
    if "model" not in values or "task" not in values and "train_file" not in values:
        raise PeftkitError("peftkit train needs a --model and a --task (or your own --train-file/--validation-file), "
                           "given as flags or in a --recipe; e.g. peftkit train --model minilm --task sst2 "
                           "--strategy lora --data-dir DIR")
    if dry_run:
        _dry_run(config, device)
        return

    split_files(config, resolve_task(config.task_name)[1])  # a wrong data path answers before torch loads
    _quiet_libraries()
    from peftkit.run import train as run_training

    try:
        result = run_training(config)
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the hint short
        _say_how_to_resume(Path(config.output_dir), config.overwrite)
        raise typer.Exit(130) from None
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    typer.echo(f"saved {result.output_dir} | {metrics}")


def _say_how_to_resume(output_dir: Path, overwrite: bool) -> None:
    """After Ctrl-C: the command that continues the run from its last checkpoint, if it has
    one (a recipe's `overwrite: true` turned off: resume and overwrite exclude each other)."""

    root = checkpoint_root(output_dir)
    typer.echo("", err=True)  # off the progress bar's line
    if not complete_checkpoints(root):
        typer.echo(f"interrupted before the first checkpoint: nothing to resume in {root}", err=True)
        return
    arguments = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    if overwrite and "--overwrite" not in sys.argv:
        arguments += ["--set", "overwrite=false"]
    typer.echo(f"interrupted: the last checkpoint in {root} is kept; continue with: "
               f"{shlex.join(['peftkit', *arguments, '--resume'])}", err=True)


def _dry_run(config: Any, device: str) -> None:
    """The resolved config as YAML, the estimate for its settings on `device`, and the
    smallest of the usual GPU sizes it fits; from the model's config alone."""
    import yaml

    from peftkit.memory.estimate import FIT_SIZES_GB, estimate_run

    from peftkit.models import resolve_model

    if device not in ("cuda", "cpu"):
        raise PeftkitError(f"--device must be cuda or cpu, got '{device}'")
    check_device(config, device)
    if Path(config.model).suffix == ".json" or resolve_model(config.model).kind == "local":  # no hub fetch here
        check_against_model(config, load_config(config.model))
    typer.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
    result = estimate_run(config, device=device)
    settings = result.settings
    _print_estimate(result, f"\n{settings['strategy']} on {config.model} ({settings['task']}): batch "
                            f"{settings['batch_size']} x {settings['seq_len']} tokens, weights {settings['dtype']}, "
                            f"compute {settings['precision']}, {settings['optimizer']}, gradient checkpointing "
                            f"{'on' if settings['gradient_checkpointing'] else 'off'}, {device}")
    if device == "cuda":
        fits = [size for size in FIT_SIZES_GB if result.fits(size)]
        typer.echo(f"smallest GPU it fits: {fits[0]} GB" if fits else
                   f"fits none of {', '.join(map(str, FIT_SIZES_GB))} GB: see the switches in the README (qlora, "
                   "gradient_checkpointing, optimizer paged-adamw-8bit, a smaller batch)")


@app.command("eval")
@user_errors
@with_options(["data_dir"], extra_help={"data_dir": " Left out: where the run read it."})
def eval_(
    options: dict[str, Any],
    run: Path = typer.Option(..., help="A run directory written by `peftkit train`."),
) -> None:
    """Reload a run and recompute its validation metrics."""
    data_dir = Path(options["data_dir"]) if "data_dir" in options else None
    from peftkit.inference import evaluate_run

    read_record(run)  # a wrong --run answers before any library loads
    _quiet_libraries()
    result = evaluate_run(run, data_dir)
    for name, value in result["metrics"].items():
        recorded = result["recorded"].get(name)
        note = f"  (run.json: {recorded:.4f})" if recorded is not None else ""
        typer.echo(f"{name}: {value:.4f}{note}")


@app.command()
@user_errors
def predict(
    texts: list[str] = typer.Argument(None, help="One input: the text to classify (two texts for a sentence-pair task)."),
    run: Path = typer.Option(..., help="A run directory written by `peftkit train`."),
    file: Optional[Path] = typer.Option(None, help="JSON Lines of inputs, each with the run's text columns; one process, batched."),
) -> None:
    """Classify text with a trained run: prints the label and its probability (per --file line,
    a JSON object with the input and its prediction)."""
    import json

    from peftkit.inference import predict as predict_labels
    from peftkit.inference import predict_inputs

    inputs = predict_inputs(run, texts, file)
    _quiet_libraries()
    lines = predict_labels(run, inputs)
    for example, line in zip(inputs, lines):
        typer.echo(json.dumps({"input": example, "prediction": line}, ensure_ascii=False) if file else line)


@app.command()
@user_errors
def generate(
    prompts: list[str] = typer.Argument(None, help="User messages to answer (the run's chat template is applied)."),
    run: Path = typer.Option(..., help="A run directory written by `peftkit train` on an sft task."),
    file: Optional[Path] = typer.Option(None, help="JSON Lines of {\"prompt\": ...} or {\"messages\": [...]}; answers go to stdout as JSON Lines."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Tokens to generate at most (default: the run's)."),
) -> None:
    """Answer prompts with an instruction-tuned run: greedy decoding, batched."""
    import json

    from peftkit.inference import check_generates, generate_answers, read_conversations

    if bool(prompts) == bool(file):
        raise PeftkitError("give prompts as arguments or --file FILE.jsonl, not both and not neither")
    check_generates(run)
    conversations = read_conversations(file) if file else [[{"role": "user", "content": p}] for p in prompts]
    _quiet_libraries()
    replies, limit = generate_answers(run, conversations, max_new_tokens)
    for conversation, reply in zip(conversations, replies):
        typer.echo(json.dumps({"prompt": conversation[-1]["content"], "generated": reply.text,
                               "finished": reply.finished}, ensure_ascii=False) if file else reply.text)
    cut = sum(not reply.finished for reply in replies)
    if cut:
        typer.echo(f"note: {cut} of {len(replies)} answers stopped at --max-new-tokens {limit} before they ended: "
                   "pass a larger --max-new-tokens for whole answers", err=True)


@app.command()
@user_errors
def merge(
    run: Path = typer.Option(..., help="A run directory written by `peftkit train` (lora, dora, qlora, ia3, peft:<method>)."),
    output: Path = typer.Option(..., help="Where to write the merged transformers checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an earlier merged checkpoint in --output (never other files)."),
    dtype: Optional[str] = typer.Option(None, help="Weights of the merged checkpoint: fp32, bf16 or fp16 "
                                                   "(default: the dtype the run's weights had)."),
) -> None:
    """Fold a run's adapter into the base weights and save a plain transformers checkpoint."""
    from peftkit.merge import check_merge, merge_run

    check_merge(run, output, overwrite, dtype)
    _quiet_libraries()
    note = merge_run(run, output, overwrite, dtype)
    chosen = "as --dtype asked" if dtype else "the run's weights dtype; --dtype fp32 for full precision"
    typer.echo(f"merged {note['strategy']['name']} into the unquantized base, saved in {note['dtype']} ({chosen}): {output}")


@app.command()
@user_errors
def strategies(
    model: Optional[str] = typer.Option(None, help="Also count trainable parameters on this model."),
    all_peft: bool = typer.Option(False, help="Also list every peft:<method> (~40 rows; counted too with --model, slowly)."),
    task: str = typer.Option("classification", help="Task kind or built-in data set: what applies to it, and counts for it."),
) -> None:
    """List the registered strategies, what they train, their options, whether they apply to
    the task and (with --model) their trainable counts on it."""
    from rich.console import Console
    from rich.table import Table

    kind = resolve_task(task)[0]
    if all_peft:
        load_peft_registry()
    table = Table("strategy", "trains", "options", f"applies to {kind.name}", title="peftkit strategies")
    counts: dict[str, tuple[int, int] | None] = {}
    if model:
        _quiet_libraries()
        from peftkit.strategy_table import count_for_model

        counts = count_for_model(model, [n for n in sorted(STRATEGIES) if all_peft or not n.startswith("peft:")], kind)
        table.add_column("trainable", justify="right")
        table.add_column("%", justify="right")
    shown = [n for n in sorted(STRATEGIES) if all_peft or not n.startswith("peft:")]
    for name in shown:
        cls = STRATEGIES[name]
        row = [name, cls.trains, cls.main_options(), _applies(build_strategy, name, kind)]
        if model and counts[name] is None:
            row += ["-", "-"]  # cannot train this model with its default options
        elif model:
            trainable, total = counts[name]
            row += [f"{trainable:,}", f"{100 * trainable / total:.3f}"]
        table.add_row(*row)
    console = Console(width=shutil.get_terminal_size((160, 24)).columns)  # the terminal's, or 160 when piped
    console.print(table)
    if not all_peft:
        console.print("and peft:<method> for every other PEFT method (peft:loha, peft:vera, ...): --all-peft lists them")


def _applies(build: Callable, name: str, task: Any) -> str:
    """'yes', or why not: the task's (or the strategy's) refusal, shortened."""
    try:
        task.check_strategy(build(name))
    except PeftkitError as err:
        return "no: " + str(err).split(": ", 1)[-1][:60]
    return "yes"


@app.command()
@user_errors
@with_options(["model", "task", "data_dir"], defaults={"model": SCHEMA_DEFAULT, "task": SCHEMA_DEFAULT})
def compare(
    options: dict[str, Any],
    strategies: str = typer.Option(..., help="Comma-separated strategies, e.g. full,lora,bitfit."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    out: Path = typer.Option(..., help="Directory for runs.jsonl, configs, logs and the runs."),
    recipe_dir: Optional[Path] = typer.Option(None, help="Per-strategy recipes named <model>-<task>-<strategy>.yaml."),
    set_: list[str] = typer.Option([], "--set", help="key=value for every run."),
    retry_failed: bool = typer.Option(False, help="Run again the cells whose last attempt failed."),
    num_processes: int = typer.Option(1, min=1, help="Run each cell data-parallel under `accelerate launch` with N processes."),
    accelerate_config: Optional[Path] = typer.Option(None, help="An accelerate config (recipes/accelerate/*.yaml) for every cell."),
) -> None:
    """Run every (strategy, seed) in a fresh process; resumable; one JSON line per run."""
    model, task = options["model"], options["task"]
    data_dir = Path(options["data_dir"]) if "data_dir" in options else None
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from peftkit import compare as harness

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise PeftkitError(f"--seeds takes comma-separated integers, got '{seeds}'") from None
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    harness.stop_cells_on_sigterm()
    cells = harness.plan(model, task, names, seed_list, out, recipe_dir, set_, data_dir)
    start = harness.launcher(num_processes, accelerate_config)
    out.mkdir(parents=True, exist_ok=True)
    records = harness.read_runs(out)
    todo = harness.pending(cells, records, retry_failed)
    harness.forget(out, {c.key for c in todo if c.key in records})

    metric = headline_metric(*resolve_task(cells[0].config.task_name)) if cells else "accuracy"

    def table() -> Table:
        view = Table("strategy", "seed", "status", metric, "train s", "peak MB", title=f"peftkit compare -> {out}")
        current = harness.read_runs(out)
        for cell in cells:
            record = current.get(cell.key)
            if record is None:
                view.add_row(cell.strategy, str(cell.seed), "running" if cell is running else "pending", "", "", "")
            elif record.run is not None:
                view.add_row(cell.strategy, str(cell.seed), "ok", f"{record.run.metrics.get(metric, float('nan')):.4f}",
                             f"{record.run.train_time_s:.0f}", f"{record.run.peak_memory_bytes / 2**20:.0f}")
            else:
                view.add_row(cell.strategy, str(cell.seed), "failed", (record.error or "")[:60], "", "")
        return view

    running = None
    with Live(table(), console=Console(), auto_refresh=False) as live:
        for cell in todo:
            running = cell
            live.update(table(), refresh=True)
            failed_before = cell.key in records and records[cell.key].status == "failed"  # its checkpoints may be the cause
            harness.append_run(out, harness.run_cell(cell, out, shlex.join(["peftkit", *sys.argv[1:]]), start,
                                                     may_resume=not failed_before))
        running = None
        live.update(table(), refresh=True)
    failed = [k for k, r in harness.read_runs(out).items() if r.status != "ok"]
    if failed:
        typer.echo(f"{len(failed)} run(s) failed ({', '.join(failed)}): see {out}/logs; --retry-failed runs them again", err=True)
        raise typer.Exit(1)


@app.command()
@user_errors
def report(
    runs_dir: Path = typer.Argument(..., help="A `peftkit compare --out` directory."),
    metric: Optional[str] = typer.Option(None, help="The metric to rank by (default: the data set's or the task's, "
                                                    "e.g. accuracy; exact_match for sst2-chat; rouge_l for dolly)."),
    title: Optional[str] = typer.Option(None, help="Title of the tables and page."),
    allow_mixed: bool = typer.Option(False, help="Report rows made by different code versions together."),
    samples: int = typer.Option(3, min=0, help="Tasks that save answers (sft, seq2seq, qa): inputs shown with "
                                               "every row's answer in generations.md (0: none)."),
) -> None:
    """Write results.md/.csv/.json, PNG plots and an HTML page from runs.jsonl (and, where the
    task saves answers, generations.md: every row's answers to the same inputs)."""
    from peftkit.report.write import write_report

    for path in write_report(runs_dir, metric, title, allow_mixed, samples):
        typer.echo(str(path))


ESTIMATED = ["model", "strategy", "task", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "dtype",
             "precision", "attn_implementation", "gradient_checkpointing", "optimizer", "quantization", "select",
             "max_new_tokens", "num_beams"]


@app.command()
@user_errors
@with_options(ESTIMATED, defaults={"model": NO_DEFAULT, "strategy": NO_DEFAULT, "task": "classification"},
              extra_help={"precision": " Left out: the dtype's (fp32 weights compute in fp32).",
                          "max_new_tokens": " 0: no generation is counted (left out: 64 for tasks that generate)."})
def estimate(
    options: dict[str, Any],
    set_: list[str] = typer.Option([], "--set", help="Strategy option key=value, e.g. --set r=16."),
    seq_len: Optional[int] = typer.Option(None, min=1, help="Tokens per example (default: train's max_length for "
                                                           "the task: 128 classification, 384 qa, 1024 sft, ...)."),
    device: str = typer.Option("cuda", help="cuda or cpu (cpu adds the process's own runtime memory)."),
    answer_tokens: Optional[int] = typer.Option(None, min=1, help="sft: the longest answer in tokens (the LM head "
                                                "scores answer positions only; default: every position); seq2seq: "
                                                "the target's length (default: --seq-len, the source's)."),
) -> None:
    """Analytic peak training memory from the model's config alone (--model may also be a
    config.json file), and which GPUs it fits. Options left out take `peftkit train`'s
    defaults for the task."""
    from peftkit.recipes import apply_overrides

    check_values({k: v for k, v in options.items() if not (k == "max_new_tokens" and v == 0)})
    fields = option_fields()
    given = {name: options.get(name, fields[name][1].default) for name in ESTIMATED if name != "precision"}
    model, task, precision = given["model"], given["task"], options.get("precision")
    strategy_options = apply_overrides({"strategy": options["strategy"]}, set_)["strategy"]
    built = build_strategy(strategy_options.pop("name"), strategy_options)  # a wrong name or option answers before torch loads
    kind = resolve_task(task)[0]
    batch_size, eval_batch_size = given["batch_size"], given["eval_batch_size"]
    seq_len = seq_len or kind.default_max_length
    max_new_tokens = options.get("max_new_tokens", given["max_new_tokens"] if kind.generates_text else 0)
    gradient_checkpointing, optimizer = given["gradient_checkpointing"], given["optimizer"]
    from peftkit.memory.estimate import FIT_SIZES_GB
    from peftkit.memory.estimate import estimate as compute

    result = compute(model, built, batch_size, seq_len, given["dtype"],
                     gradient_checkpointing, optimizer, device=device, quantization=given["quantization"],
                     eval_batch_size=eval_batch_size, task=task, max_new_tokens=max_new_tokens, precision=precision,
                     attn_implementation=given["attn_implementation"], keeps_best=given["select"] == "best",
                     answer_tokens=answer_tokens, eval_answer_tokens=answer_tokens, num_beams=given["num_beams"] or 1,
                     accumulates_gradients=given["gradient_accumulation_steps"] > 1)
    settings = result.settings
    _print_estimate(result, f"{options['strategy']} on {model} ({settings['task']}): batch {batch_size} x {seq_len} tokens, "
                            f"weights {settings['dtype']}, compute {settings['precision']}, {optimizer}, "
                            f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}, {device}")
    for size in FIT_SIZES_GB:
        typer.echo(f"{size} GB: {'fits' if result.fits(size) else 'does not fit'}")


def _print_estimate(result: Any, heading: str) -> None:
    """An estimate's terms and total in GiB under a heading, and its parameter counts."""
    from rich.console import Console
    from rich.table import Table

    from peftkit.memory.estimate import GB

    table = Table("term", "GiB")
    for term, value in result.terms.items():
        table.add_row(term, f"{value / GB:.2f}")
    table.add_row("total (training or evaluation phase, the larger)", f"{result.total_bytes / GB:.2f}")
    console = Console(width=120)
    console.print(heading)
    console.print(table)
    console.print(f"trainable {result.trainable_params:,} of {result.total_params:,} parameters")


def main() -> None:
    app(prog_name="peftkit")


if __name__ == "__main__":
    sys.exit(main())
