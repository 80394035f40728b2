"""The task interface, its registry, and the built-in data sets that name a task kind.

A `Task` answers every question the rest of peftkit has about what is learned, so that no
module outside `peftkit/tasks/` branches on the kind: the run asks it for data, the model,
the trainer and the metrics; a strategy asks it which modules train beside the strategy
(a new classifier head, or nothing for a causal LM's pretrained head); `compare`, `report`
and `estimate` ask it for metric names and what dominates memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from peftkit.anatomy import unwrap_peft
from peftkit.data import BuiltinDataset, TaskData, split_off
from peftkit.errors import PeftkitError, did_you_mean
from peftkit.options import TaskOptions

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig
    from peftkit.record import RunRecord
    from peftkit.strategies import Strategy

TASKS: dict[str, Task] = {}
DATASETS: dict[str, BuiltinDataset] = {}


def register_task(name: str):
    """Class decorator: make a Task subclass available as `--task name` (one instance)."""

    def wrap(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls()
        return cls

    return wrap


class Task:
    """Base of every task kind. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model_class: ClassVar[str] = ""          # transformers Auto class, e.g. "AutoModelForCausalLM"
    model_suffix: ClassVar[str] = ""         # class-name suffix of the models it trains, e.g. "ForCausalLM"
    peft_task_type: ClassVar[str] = ""       # peft.TaskType member name
    metrics: ClassVar[tuple[str, ...]] = ()  # what the run record reports
    selects: ClassVar[str] = ""              # the metric that picks the best checkpoint by default
    primary: ClassVar[str] = ""              # the metric a comparison table leads with (unless the data set names its `headline`)
    table_metrics: ClassVar[tuple[str, ...]] = ()  # the metrics a comparison table shows
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "perplexity"})
    pretrained_head: ClassVar[bool] = False  # True: the output layer is the model's own (nothing new trains beside)
    generates_text: ClassVar[bool] = False   # True: `answer` generates replies (`peftkit generate`)
    predicts: ClassVar[bool] = True          # False: `peftkit predict` refuses its runs (they answer through `generate`)
    reads_one_vector: ClassVar[bool] = False  # True: the head reads one vector per example (pooling applies)
    default_max_length: ClassVar[int] = 128
    rows_per_example: ClassVar[int] = 1      # sequences one example puts in a batch (a preference pair: 2)
    reads: ClassVar[str] = ""                # the form of data it reads (default: its name): kinds that read the same
                                             # form take each other's data sets as KIND:DATA-SET (dpo, kto: "pairs")
    options: ClassVar[type[TaskOptions]] = TaskOptions  # this kind's own option group (peftkit.options.tasks)
    # the keys of a predictions.jsonl line: the input, its reference answers (a list), the model's answer;
    # None: the task saves no per-example answers
    prediction_fields: ClassVar[tuple[str, str, str] | None] = None

    def check_strategy(self, strategy: Strategy) -> None:
        """Refuse a strategy that means nothing for this task, before any weights load."""
        if self.pretrained_head and strategy.frozen_below_head:
            raise PeftkitError(f"strategy '{strategy.name}' trains only a new task head, and task '{self.name}' has "
                               "none (the model's own output layer is kept): pick lora, full, adapter, ...")
        if not self.pretrained_head and not strategy.trains_anything:
            raise PeftkitError(f"strategy '{strategy.name}' trains nothing, and task '{self.name}' adds a new, "
                               "untrained head: there is no untuned model to evaluate; pick a strategy that trains")
        strategy.check_task(self)

    def keeps_reference(self, strategy: Strategy) -> bool:
        """Whether training holds a frozen copy of the model beside it (a reference model the
        strategy's adapter cannot stand in for; the estimate counts it). Default: no."""
        return False

    def check_config(self, config: RunConfig, strategy: Strategy) -> None:
        """Refuse options that mean nothing together for this task (default: accept all)."""

    def output_memory(self, config: Any, batch_size: int, seq_len: int, eval_batch_size: int, eval_seq_len: int,
                      bytes_per_value: int, device: str, max_new_tokens: int, answer_tokens: int | None = None,
                      eval_answer_tokens: int | None = None, num_beams: int = 1,
                      generation_batch: tuple[int, int] = (1, 1)) -> dict[str, int]:
        """Memory the task's output layer needs beyond the layers' activations (peftkit.memory):
        `output_layer` while training, `evaluation_output` while evaluating, and for a
        decoder-only LM `generation_cache` while generating (its keys and values) in batches of
        at most `generation_batch` (rows, prompt tokens); `answer_tokens` bounds the positions of
        one example that carry a label (None: every position), and generation runs `num_beams`
        beams per example. Default: none (a classifier head keeps one small input, counted with
        the activations)."""
        return {}

    def estimate_options(self, config: RunConfig) -> dict[str, Any]:
        """This kind's own options that a run's memory estimate reads
        (`peftkit.memory.estimate.estimate_run`): `max_new_tokens` generated per answer,
        `num_beams` per example, `max_target_length` (the answer tokens before a run has
        measured its data; None: every position) and `packing` (training rows filled to
        max_length). Default: nothing generated, no target length, unpacked rows."""
        return {"max_new_tokens": 0, "num_beams": 1, "max_target_length": None, "packing": False}

    def longest_answers(self, prepared: Prepared, config: RunConfig) -> dict[str, int]:
        """The most labelled positions of one training example and of one evaluated example
        (selection slice, validation, test), for tasks whose output layer works on those alone
        (run records keep them for the estimate), and where that layer scores only labelled
        positions, the most one batch of the run can hold (`config`'s batch sizes).
        Default: none (every position counts)."""
        return {}

    def feature_rows(self, prepared: Prepared) -> dict[str, int]:
        """How many feature vectors a linear probe on cached features keeps in memory (the
        training split and the selection slice; run records keep it for the estimate).
        Default: none (the task trains no head on cached features)."""
        return {}

    def greater_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better

    def owns(self, model: nn.Module) -> bool:
        """Whether a loaded model is of this task's kind (for the Python API's defaults)."""
        return type(model).__name__.endswith(self.model_suffix)

    def trained_beside(self, model: nn.Module) -> tuple[str, ...]:
        """Top-level modules that train beside the strategy (a new classifier head), by name."""
        return ()

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        raise NotImplementedError

    def hold_out_selection(self, data: TaskData, config: RunConfig) -> None:
        """Move `selection_fraction` of the training examples, drawn with the seed, into the
        selection slice (a task with labels stratifies by them)."""

        data.train, data.selection = split_off(data.train, config.selection_fraction, config.seed)

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        """The model for this task from a source; `info` is `TaskData.info` (or a run's record
        of it); `weights` are `peftkit.models.load_pretrained`'s dtype and attn_implementation."""
        raise NotImplementedError

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Every split tokenized, each with a `length` column (tokens)."""
        raise NotImplementedError

    def build_trainer(self, model: nn.Module, strategy: Strategy, config: RunConfig, prepared: Prepared,
                      tokenizer: Any, scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        """A transformers Trainer (or TRL trainer) for this run."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """The final metrics of the model as saved on one split, and what it produced (generations)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, tokenizer: Any, record: RunRecord, examples: list[list[str]],
                config: RunConfig) -> list[str]:
        """What a trained model says about each input (its texts, in `input_fields` order), one
        line each (`peftkit predict`)."""
        raise NotImplementedError

    def input_fields(self, record: RunRecord) -> list[str]:
        """The fields one input to `predict` has, in order (a `--file` line's keys)."""
        raise NotImplementedError

    def answer(self, model: nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
               batch_size: int) -> list[str]:
        """Generated replies to conversations, for tasks that `generates_text`."""
        raise NotImplementedError


@dataclass
class Prepared:
    """Tokenized splits by name, ready for a trainer, and the raw splits they came from."""

    splits: dict[str, Any]
    raw: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # TaskData.info
    scratch: dict[str, Any] = field(default_factory=dict)  # what a task computes once for its evaluation, unrecorded

    @property
    def train(self) -> Any:
        return self.splits["train"]

    @property
    def validation(self) -> Any:
        return self.splits["validation"]

    @property
    def selection(self) -> Any:
        """The held-out slice the checkpoint is chosen on (None with select=last)."""
        return self.splits.get("selection")


def references_of(row: dict[str, Any], column: str | None, answer: str, split: str, index: int) -> list[str]:
    """The texts an example's generation is scored against: the list in `column` where the
    data has one (every reference summary), else its own `answer`."""
    if column is None:
        return [answer]
    given = row.get(column)
    if not isinstance(given, list) or not given or not all(isinstance(r, str) for r in given):
        raise PeftkitError(f"{split} row {index}: column '{column}' must be a non-empty list of reference texts")
    return given


def language_model_loss(loss: float) -> dict[str, float]:
    """A language model's mean token loss and its perplexity (exp capped against overflow)."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def rows_to_generate(rows: Any, config: RunConfig) -> Any:
    """The first `max_generate_samples` rows of a split (all when None): what generation is scored on."""
    limit = config.max_generate_samples
    return rows if limit is None or limit >= len(rows) else rows.select(range(limit))


def cut_by_truncation(lengths: list[int], max_length: int, whole_lengths: Callable[[list[int]], list[int]]) -> set[int]:
    """Which examples truncation at `max_length` cut, given their token counts after it: only
    one that now fills `max_length` can have been, so only those are measured whole
    (`whole_lengths` of their indices), not every example a second time."""
    full = [i for i, n in enumerate(lengths) if n == max_length]
    return {i for i, n in zip(full, whole_lengths(full)) if n > max_length} if full else set()


def take_truncation_counts(splits: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """The splits without their 0/1 `truncated` column, and how many examples each had cut at
    `max_length` (the run record's `truncated_examples`)."""
    counts = {name: int(sum(split["truncated"])) for name, split in splits.items()}
    return {name: split.remove_columns("truncated") for name, split in splits.items()}, counts


PREDICTIONS = "predictions.jsonl"  # a run's per-example answers (`Task.prediction_fields` names their keys)


@dataclass
class Evaluation:
    """Final metrics, per-example outputs to save beside the model (None when the task has
    none), and for tasks that generate, how the generations ended (`generation_summary`)."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] | None = None
    generation: dict[str, int] | None = None


@dataclass(frozen=True)
class Reply:
    """One generated answer, and whether it ended by itself (an end-of-turn or end-of-text
    token) or was cut at `max_new_tokens`."""

    text: str
    finished: bool


def generation_summary(replies: list[Reply], max_new_tokens: int, split: str) -> dict[str, int]:
    """How many replies were cut at `max_new_tokens` (a run record's `generation`), said in
    one line when any were: a cut answer scores as wrong, and the fix is a larger limit."""
    cut = sum(not reply.finished for reply in replies)
    if cut:
        print(f"note: {cut} of {len(replies)} {split} generations stopped at max_new_tokens={max_new_tokens} before "
              f"they ended (raise it with --set max_new_tokens=N)", flush=True)
    return {"generated": len(replies), "cut_at_max_new_tokens": cut, "max_new_tokens": max_new_tokens}


def resolve_task(name: str) -> tuple[Task, BuiltinDataset | None]:
    """`--task` as a kind (`classification`, `sft`, ...), a built-in data set (`sst2`, ...), or
    a kind and a data set of another kind that reads the same form of data
    (`kto:hh-rlhf-harmless`, `grpo:sst2-chat`)."""
    if ":" in name:
        kind, _, data_set = name.partition(":")
        task, dataset = resolve_task(kind)[0], resolve_task(data_set)[1]
        if dataset is None:
            raise PeftkitError(f"task '{name}': '{data_set}' is not a built-in data set (KIND:DATA-SET names one)")
        if _form(task) != _form(TASKS[dataset.kind]):
            kinds = [other for other, t in TASKS.items() if _form(t) == _form(TASKS[dataset.kind])]
            raise PeftkitError(f"task '{name}': {kind} cannot read data set {data_set}, made for {dataset.kind}; "
                               f"kinds that can: {', '.join(kinds)}")
        return task, dataset
    if name in DATASETS:
        dataset = DATASETS[name]
        return TASKS[dataset.kind], dataset
    if name in TASKS:
        return TASKS[name], None
    raise PeftkitError(
        f"unknown task '{name}'{did_you_mean(name, [*DATASETS, *TASKS])}: use a task kind for your own files "
        f"({', '.join(TASKS)}) or a built-in data set ({', '.join(DATASETS)})"
    )


def _form(task: Task) -> str:
    return task.reads or task.name


def load_data(config: RunConfig) -> TaskData:
    """Load and check the data the config names, as its task reads it."""
    task, dataset = resolve_task(config.task_name)
    return task.load_data(config, dataset)


def headline_metric(task: Task, dataset: BuiltinDataset | None) -> str:
    """The metric a comparison leads with: the built-in data set's own where it names one
    (open-ended answers are read by ROUGE-L, not exact match), else its task kind's."""
    own = dataset is not None and dataset.headline in task.metrics
    return dataset.headline if own else task.primary


def task_for_model(model: nn.Module) -> Task:
    """The task kind a loaded model was built for (a PEFT wrapper is looked through); the
    Python API's default when `apply_strategy` is given no task."""

    inner = unwrap_peft(model)
    for task in TASKS.values():
        if task.owns(inner):
            return task
    return TASKS["classification"]
