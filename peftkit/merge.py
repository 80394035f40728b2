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

from peftkit.config import config_values, make_config
from peftkit.errors import PeftkitError
from peftkit.run import load_run, package_versions, read_record, write_directory
from peftkit.strategies.peft_base import first_line

MERGE_NOTE = "merge.json"


def merge_run(run_dir: Path, output_dir: Path, overwrite: bool = False) -> dict[str, Any]:
    """Merge the run's adapter into its base and write the checkpoint to `output_dir`
    (staged, then renamed into place). Returns the note saved there as merge.json."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    record = read_record(run_dir)
    run_config = make_config(config_values(record))
    strategy = run_config.strategy.build()
    if strategy.merge_refusal:
        raise PeftkitError(f"strategy {strategy.name} cannot be merged: {strategy.merge_refusal}")
    if run_config.pooling == "mean":  # plain transformers would feed the head the [CLS] pooler instead
        raise PeftkitError("this run's head reads the mean of the last hidden states (pooling mean), which a plain "
                           "transformers classifier cannot do: use the run through peftkit (predict, eval), "
                           "or train it with --pooling model to merge it")
    if output_dir.resolve() == run_dir.resolve():
        raise PeftkitError(f"--output {output_dir} is the run itself: write the merged checkpoint somewhere else")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise PeftkitError(f"output directory {output_dir} is not empty: choose another --output or pass --overwrite")

    config, model, tokenizer, _ = load_run(run_dir, quantized=False)
    quantized = strategy.quantization_config(None) is not None or config.quantization != "none"
    try:
        merged = model.merge_and_unload()
    except (NotImplementedError, ValueError) as err:  # PEFT: a method or layer without a merge
        raise PeftkitError(f"strategy {strategy.name} cannot be merged: {first_line(err)}") from None

    note = {
        "run": str(run_dir.resolve()),
        "model": config.model,
        "strategy": record["config"]["strategy"],
        "merged_into": f"unquantized {next(merged.parameters()).dtype} base".replace("torch.", ""),
        # the run's metrics describe these weights only when the run's base was not 4-bit: a
        # qlora adapter folded into the unquantized base computes something else
        "run_metrics": None if quantized else record["metrics"],
        "metrics_note": ("the run trained on a 4-bit base; these merged weights were never evaluated "
                         "(peftkit's metrics are the run's): evaluate them before relying on them")
                        if quantized else "the run's validation metrics, which these merged weights reproduce",
        "versions": package_versions(),
    }

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MERGE_NOTE).write_text(json.dumps(note, indent=2) + "\n")

    write_directory(output_dir, write)
    return note
