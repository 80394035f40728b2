"""`peftkit merge`: fold a run's PEFT adapter into its base weights and save a plain
transformers checkpoint (weights, config with the label names, tokenizer) that loads with
`AutoModelForSequenceClassification.from_pretrained` and needs neither peft nor peftkit.

QLoRA is merged into a freshly loaded *unquantized* base, never into its 4-bit weights:
bitsandbytes repacks 4-bit weights on CPU after the first forward in eval mode, and merging
then silently gives wrong weights. The merged model is therefore the trained adapter on the
full-precision base; it differs from the 4-bit model that was trained and evaluated by the
base's quantization error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.outputs import check_replaceable, check_writable, write_directory
from peftkit.record import RunRecord, read_record
from peftkit.resolve import make_config

MERGE_NOTE = "merge.json"
DTYPES = ("fp32", "bf16", "fp16")


def check_merge(run_dir: Path, output_dir: Path, overwrite: bool = False, dtype: str | None = None) -> RunRecord:
    """Everything that can be wrong with a merge, from the run's record alone (no library
    loads): a strategy or head plain transformers cannot hold, an output that is the run itself
    or holds other files, an unknown dtype. Returns the run's record."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    record = read_record(run_dir)
    run_config = make_config(record.config_values())
    strategy = run_config.build_strategy()
    if strategy.merge_refusal:
        raise PeftkitError(f"strategy {strategy.name} cannot be merged: {strategy.merge_refusal}")
    if run_config.pooling == "mean":  # plain transformers would feed the head the [CLS] pooler instead
        raise PeftkitError("this run's head reads the mean of the last hidden states (pooling mean), which a plain "
                           "transformers classifier cannot do: use the run through peftkit (predict, eval), "
                           "or train it with --pooling model to merge it")
    if dtype is not None and dtype not in DTYPES:
        raise PeftkitError(f"--dtype must be one of {', '.join(DTYPES)} (or left out: the run's weights dtype), got '{dtype}'")
    if output_dir.resolve() == run_dir.resolve():
        raise PeftkitError(f"--output {output_dir} is the run itself: write the merged checkpoint somewhere else")
    check_writable(output_dir, "--output")
    check_replaceable(output_dir, MERGE_NOTE, overwrite, "merged checkpoint", "--output")
    return record


def merge_run(run_dir: Path, output_dir: Path, overwrite: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """Merge the run's adapter into its base, in `dtype` (default: the dtype the run's
    weights had), and write the checkpoint to `output_dir` (staged, then renamed into place).
    Returns the note saved there as merge.json."""
    from peftkit.loading import merged_model  # torch, transformers: not for check_merge's fast refusals
    from peftkit.run import package_versions

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    record = check_merge(run_dir, output_dir, overwrite, dtype)
    config, merged, tokenizer = merged_model(run_dir, **({"dtype": dtype, "precision": dtype} if dtype else {}))
    strategy = config.build_strategy()
    quantized = strategy.quantization_config(None) is not None or config.quantization != "none"
    saved_dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")

    note = {
        "run": str(run_dir.resolve()),
        "model": config.model,
        "strategy": record.config["strategy"],
        "merged_into": f"unquantized {saved_dtype} base",
        "dtype": saved_dtype,
        "dtype_chosen_by": "--dtype" if dtype else "the run's weights dtype",
        # the run's metrics describe these weights only when the run's base was not 4-bit: a
        # qlora adapter folded into the unquantized base computes something else
        "run_metrics": None if quantized else record.metrics,
        "metrics_note": ("the run trained on a 4-bit base; these merged weights were never evaluated "
                         "(peftkit's metrics are the run's): evaluate them before relying on them")
                        if quantized else "the run's validation metrics, which these merged weights reproduce"
                        + (" up to the rounding of --dtype" if dtype else ""),
        "versions": package_versions(),
    }

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MERGE_NOTE).write_text(json.dumps(note, indent=2) + "\n")

    write_directory(output_dir, write, MERGE_NOTE)
    return note
