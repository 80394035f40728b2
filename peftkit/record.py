"""A finished run's record (run.json) and a comparison's lines (runs.jsonl), typed and read
without torch: every command that takes a run checks it, and what it asks of the run, before
any library or weight loads.

`RunRecord` is run.json's schema, one field per key, in the file's order. What records from
before a field was kept lack takes the field's default here, and the migrations of older
records live here as its methods: `config_values` (the config as today's options read it)
and `trained_precision` (the dtype and precision it reloads in). `CellRecord` is one line of
`peftkit compare`'s runs.jsonl: the cell's own fields and, for a run that finished, its run
record's fields, all on one flat line as ever. Both write back exactly the keys they read
(`RunRecord.dump`, `CellRecord.line`), so that rewriting an old line changes nothing in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftkit.errors import PeftkitError

RUN_RECORD = "run.json"
Number = Union[int, float]  # a JSON number as written: 3 reads and writes back as 3, 3.0 as 3.0


class _Strict(BaseModel):
    """A record as written: no unknown key, no value of another type (a number in quotes is
    not a number), infinities and NaN written as JSON's Infinity and NaN (as `json` does)."""

    model_config = ConfigDict(strict=True, extra="forbid", ser_json_inf_nan="constants")


class Provenance(_Strict):
    """Which code trained a run, and with which config."""

    commit: str = Field(description="The git commit of the peftkit checkout that trained the run ('unknown' outside "
                                    "a git checkout, an installed wheel).")
    dirty: bool | None = Field(description="Whether that checkout had uncommitted changes to peftkit/ or "
                                           "pyproject.toml (None: not a git checkout).")
    config_hash: str = Field(description="A hash of the resolved config (`peftkit.provenance.config_hash`): "
                                         "`peftkit compare` re-runs a cell whose config no longer hashes the same.")


class Precision(_Strict):
    """What `dtype` and `precision` auto resolved to on the run's device."""

    weights: str = Field(description="The dtype the base's weights were loaded in (fp32, bf16, fp16).")
    compute: str = Field(description="The precision forward and backward computed in (fp32, bf16, fp16).")


class Selection(_Strict):
    """Which weights the run kept, and on what they were chosen."""

    select: str = Field(description="best (the evaluation that scored best on the held-out slice) or last (the "
                                    "final weights).")
    metric: str | None = Field(description="The metric the best weights were chosen by (None for select last).")
    on: str = Field(description="What they were chosen on, in words: 'held-out slice of the training data' or "
                                "'final weights'.")


class Generation(_Strict):
    """How the validation split's generated answers ended (`peftkit.tasks.base.generation_summary`)."""

    generated: int = Field(description="Answers generated.")
    cut_at_max_new_tokens: int = Field(description="Answers cut at max_new_tokens before they ended (scored as they were).")
    max_new_tokens: int = Field(description="The limit they were generated under.")


class TrainLoss(_Strict):
    """The training loss Trainer logged at the end of one epoch."""

    epoch: Number = Field(description="The epoch the loss was logged at.")
    loss: Number = Field(description="The mean training loss since the previous log, over every rank.")


class RunRecord(_Strict):
    """run.json: what a finished run trained, on what, how well, how fast and in how much
    memory. A field without a default has been in every record peftkit ever wrote; a default
    is what a record from before that field was kept means."""

    config: dict[str, Any] = Field(description="The resolved run config (`RunConfig.model_dump`, resume false: it "
                                               "retrains the run whole). Read it through `config_values`, which "
                                               "migrates older records' configs.")
    provenance: Provenance | None = Field(None, description="The code and config that trained it (None: records "
                                                            "from before it was kept).")
    task_kind: str = Field("classification", description="The task kind trained (`peftkit.tasks.TASKS`); records "
                                                         "from before it was kept are classifiers.")
    learning_rate: float = Field(description="The learning rate in force: the config's, else the strategy's default.")
    versions: dict[str, str] = Field(description="Python's version and those of the packages that decide a run's "
                                                 "numbers (`peftkit.run.PACKAGES`; 'not installed').")
    device: str = Field(description="The GPU's name, or 'cpu (model, vector instructions, N threads)': times from "
                                    "different machines do not pass for one machine's.")
    precision: Precision | None = Field(None, description="What dtype and precision auto resolved to (None: records "
                                                          "from before it was kept; `trained_precision` says what "
                                                          "they trained in).")
    processes: int = Field(1, description="Data-parallel ranks: metrics and throughput are over all of them.")
    data: dict[str, Any] = Field(description="The data as trained: examples per split (train, selection, validation, "
                                             "test), what the task read (label_names, text_columns, ...), "
                                             "train_tokens_per_epoch, and the longest examples and answers, which "
                                             "`peftkit estimate` reads back.")
    metrics: dict[str, Number] = Field(description="The validation split's metrics, scored once at the end, on the "
                                                   "weights as saved.")
    test_metrics: dict[str, Number] | None = Field(None, description="The same on a test split (None: the data has "
                                                                     "none, or records from before it was scored).")
    generation: Generation | None = Field(None, description="How the generated validation answers ended (None: the "
                                                            "task does not generate, or records from before).")
    selection: Selection | None = Field(None, description="Which weights were kept (None: records from before the "
                                                          "held-out protocol, which kept the epoch that scored best on "
                                                          "the validation split they report).")
    cached_features: bool = Field(False, description="Whether the frozen body's features were computed once and the "
                                                     "head trained on them (`peftkit.caches`).")
    cached_bottom_layers: int = Field(0, description="Frozen bottom layers computed once and replayed (0: none).")
    frozen_features: str | None = Field(None, description="Whether cached features were computed by this run, "
                                                          "loaded, or partly loaded (None: none cached); their "
                                                          "time counts either way.")
    best_epoch: float | None = Field(description="The epoch of the kept weights (None: select last, or nothing "
                                                 "trained).")
    eval_history: list[dict[str, Number]] = Field(default_factory=list, description="Every evaluation during "
                                                  "training, in order: its epoch and metrics (on the selection slice).")
    train_loss_history: list[TrainLoss] = Field(default_factory=list, description="The training loss at each "
                                                                                  "epoch's end.")
    epochs_trained: float = Field(description="Epochs trained (fewer than the config's when early stopping stopped).")
    train_time_s: float = Field(description="Seconds of training, without evaluation and checkpoints, summed over "
                                            "every process a resumed run took.")
    resumed_from_step: int | None = Field(None, description="The checkpoint's step the last process resumed from "
                                                            "(None: trained in one go).")
    training_processes: int = Field(1, description="Processes that trained it, one after another (more than 1: "
                                                   "resumed after an interruption; 0: nothing trained).")
    trainable_params: int = Field(description="Parameters trained (a 4-bit weight counts as two).")
    total_params: int = Field(description="Parameters of the model as trained, head and adapters included.")
    trainable_percent: float = Field(description="100 * trainable_params / total_params.")
    peak_memory_bytes: int = Field(description="Peak memory above the start (`peftkit.measure.PeakMemory`): CUDA's "
                                               "max_memory_allocated, or the CPU process's VmHWM, over every process.")
    peak_memory_reserved_bytes: int | None = Field(None, description="CUDA's max_memory_reserved (CUDA runs only: "
                                                                     "absent from CPU records).")
    samples_per_s: float | None = Field(description="Training examples per second (None: nothing trained).")
    tokens_per_s: float | None = Field(description="Training tokens per second (None: nothing trained).")
    saved_as: str = Field(description="What the strategy saved: an adapter, trained tensors, a whole model, nothing.")
    size_on_disk_bytes: int | None = Field(None, description="Bytes of every file the run saved (absent only from a "
                                                             "record that was not written: a distributed run's "
                                                             "other ranks).")
    files: list[str] | None = Field(None, description="The entries the run's directory holds, run.json included "
                                                      "(`peftkit.outputs.FILES_KEY`, added as the directory is "
                                                      "written); None: records from before it was kept.")

    def dump(self) -> dict[str, Any]:
        """The record as run.json holds it: the keys it was given, in the schema's order."""
        return self.model_dump(mode="json", exclude_unset=True)

    def config_values(self) -> dict[str, Any]:
        """The run's config as today's options read it (`current_config`)."""
        return current_config(self.config)

    def trained_precision(self) -> dict[str, str]:
        """The dtype and precision the run trained in, as config values. Records from before
        they were kept resolved auto to fp32 on CPU (and their own device's choice on a GPU,
        which auto still makes)."""
        if self.precision is not None:
            return {"dtype": self.precision.weights, "precision": self.precision.compute}
        if not self.device.startswith("cpu"):
            return {}
        dtype, precision = self.config.get("dtype", "auto"), self.config.get("precision", "auto")
        return {**({"dtype": "fp32"} if dtype == "auto" else {}),
                **({"precision": "fp32"} if precision == "auto" and dtype in ("auto", "fp32") else {})}


def current_config(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded config as today's options read it. Records from before `pooling` was a run
    setting kept it among a strategy's options, or (strategies without the option) read the
    model its own way: both say so explicitly now, so that auto does not reread them.
    (Records from before each task had its own options carry every task's, unset: the
    resolution drops those.)"""
    values = dict(recorded)
    if "pooling" not in values:
        strategy = values.get("strategy")
        if isinstance(strategy, dict) and "pooling" in strategy:
            strategy = dict(strategy)
            values["pooling"] = strategy.pop("pooling")
            values["strategy"] = strategy
        else:
            values["pooling"] = "model"
    return values


def cell_key(strategy: str, seed: int) -> str:
    """How a comparison names one (strategy, seed) cell: its runs.jsonl lines and its plan."""
    return f"{strategy}/seed{seed}"


class CellRecord(_Strict):
    """One line of `peftkit compare`'s runs.jsonl: a (strategy, seed) cell, how it ended, and
    for an ok cell its run's record, whose fields sit on the line beside the cell's (`line`)."""

    strategy: str = Field(description="The cell's label: a strategy, or a recipe's variant of one (adapter-houlsby).")
    seed: int = Field(description="The cell's seed.")
    recipe: str | None = Field(None, description="The recipe its options came from (None: the strategy's defaults).")
    command: str | None = Field(None, description="The `peftkit compare` command line that ran it.")
    finished: str | None = Field(None, description="When it ended, ISO 8601 in UTC, to the second.")
    status: Literal["ok", "failed"] = Field(description="ok (its run record follows) or failed (`error` says why).")
    error: str | None = Field(None, description="A failed cell's last error line (None when ok).")
    run: RunRecord | None = Field(None, description="An ok cell's run record (None when failed). On the line its "
                                                    "fields are the line's own, not nested.")
    estimate: dict[str, Any] | None = Field(None, description="`peftkit estimate` for the cell's config at its data's "
                                                              "longest examples: the breakdown (terms, total_bytes, "
                                                              "settings), or {'error': ...}. None: lines from before "
                                                              "it was kept.")

    @property
    def key(self) -> str:
        """The cell's key in a comparison (`cell_key`)."""
        return cell_key(self.strategy, self.seed)

    @model_validator(mode="before")
    @classmethod
    def _nest_run(cls, line: Any) -> Any:
        """A flat line's keys that are not the cell's are its run record's."""
        if not isinstance(line, dict) or "run" in line:
            return line
        own = {k: v for k, v in line.items() if k in cls.model_fields}
        run = {k: v for k, v in line.items() if k not in cls.model_fields}
        return {**own, "run": run} if run else own

    @model_validator(mode="after")
    def _run_when_ok(self) -> CellRecord:
        if self.status == "ok" and self.run is None:
            raise ValueError("an ok line holds its run's record, and this one has none")
        if self.status != "ok" and self.run is not None:
            raise ValueError(f"a {self.status} line holds no run record, and this one has its fields")
        return self

    def line(self) -> dict[str, Any]:
        """The line as runs.jsonl holds it, flat: the cell's fields, the run record's, then the
        estimate (the keys it was given, in that order)."""
        cell = self.model_dump(mode="json", exclude_unset=True, exclude={"run", "estimate"})
        estimate = {"estimate": self.estimate} if "estimate" in self.model_fields_set else {}
        return {**cell, **(self.run.dump() if self.run is not None else {}), **estimate}


def read_record(run_dir: Path) -> RunRecord:
    """The run.json of a finished run, or one line saying what is wrong with it."""
    path = Path(run_dir) / RUN_RECORD
    try:
        values = json.loads(path.read_text())
    except OSError:
        raise PeftkitError(f"{run_dir} is not a peftkit run: no readable {RUN_RECORD}") from None
    except json.JSONDecodeError as err:
        raise PeftkitError(f"{path} is not valid JSON ({err.msg}); the run is damaged, train it again") from None
    if not isinstance(values, dict) or not isinstance(values.get("config"), dict):
        raise PeftkitError(f"{path} is not a peftkit run record (no config in it): point --run at a run directory")
    try:
        return RunRecord.model_validate(values)
    except ValidationError as err:
        raise PeftkitError(f"{path} is not a run record this peftkit reads ({problem(err)}): the run is damaged "
                           "or from another peftkit version; train it again, or use the peftkit that trained it") from None


def read_cell(values: Any, where: str) -> CellRecord:
    """One parsed runs.jsonl line as a `CellRecord`, or one line naming `where` it is and what
    is wrong with it."""
    try:
        return CellRecord.model_validate(values)
    except ValidationError as err:
        raise PeftkitError(f"{where} is not a peftkit compare record ({problem(err, nested='run')}): "
                           "re-run its cell with `peftkit compare`, or remove the line") from None


def problem(err: ValidationError, nested: str | None = None) -> str:
    """A validation error's first problem in words, on one line: the field (dotted; the
    `nested` model's fields named as the line's own), and what is wrong with its value."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != nested) or "the record"
    more = f"; {err.error_count() - 1} more problem(s)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'{more}"
    if first["type"] == "missing":
        return f"no '{where}'{more}"
    message = first["msg"].removeprefix("Value error, ")
    if first["loc"]:
        message = f"'{where}': {message[:1].lower()}{message[1:]}, got {_shown(first['input'])}"
    return message + more


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
