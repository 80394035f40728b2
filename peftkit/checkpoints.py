"""Checkpoints of a training run, and resuming from the last complete one.

While a run trains, Trainer's checkpoints (the trainable weights, optimizer, scheduler, RNG
states, data position) go to `<output_dir>.checkpoints/checkpoint-<step>`, each per epoch or every
`save_steps` steps (`save_strategy`), with the checkpoint selection's state beside them (the
best weights so far, the evaluation history). Each is written into a staging folder and
renamed into place, so a checkpoint that exists is complete; at most `save_total_limit` are
kept. `--resume` continues from the last one with the same options; a finished run deletes
its checkpoints once its outputs are in place. The finished run in `output_dir` itself is
replaced only when the new run succeeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from peftkit.errors import PeftkitError
from peftkit.outputs import check_replaceable
from peftkit.record import RUN_RECORD

if TYPE_CHECKING:
    from peftkit.options import RunConfig

PREFIX = "checkpoint-"
STAGING = ".partial"                       # where a checkpoint is written before it is renamed into place
TRAINABLE = "trainable.safetensors"        # the trainable tensors at the checkpoint
SELECTION_STATE = "peftkit-selection.pt"  # KeepBestTrainable's state at the checkpoint
PROGRESS = "peftkit-progress.json"         # training time and peak memory up to the checkpoint
NO_PROGRESS: dict[str, Any] = {"train_time_s": 0.0, "memory": {}, "processes": 0}  # before a run's first process
RUN_OPTIONS = "run-options.json"           # the options the checkpoints were made with
CODE_KEY = "_peftkit_commit"               # ... and the code's commit, kept among them
# options that say how to start, not what is trained: they may differ on --resume
START_OPTIONS = frozenset({"resume", "overwrite", "force"})


def checkpoint_root(output_dir: Path) -> Path:
    """Where a run's checkpoints go while it trains: beside its output directory."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".checkpoints")


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints in `root`, oldest first (every one there is complete: see `save_atomically`)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resume_point(config: RunConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start afresh), after checking the output and
    checkpoint folders against `--resume` and `--overwrite`: finished work and interrupted
    work are never replaced unasked."""
    root = checkpoint_root(output_dir)
    if config.resume:
        checkpoints = complete_checkpoints(root)
        if not checkpoints:
            raise PeftkitError(f"--resume: no complete checkpoint in {root}: nothing to resume; train without --resume")
        stored = json.loads((root / RUN_OPTIONS).read_text()) if (root / RUN_OPTIONS).is_file() else {}
        differing = sorted(k for k, v in _options(config).items() if stored.get(k) != v)
        if differing:
            raise PeftkitError(f"--resume: the checkpoints in {root} were made with other options "
                               f"({', '.join(differing[:5])}{', ...' if len(differing) > 5 else ''}): resume with the "
                               "same options, or start over with --overwrite")
        _check_only_checkpoints(root)
        check_replaceable(output_dir, RUN_RECORD, True, "run", "--output-dir")  # an earlier run, never your files
        return checkpoints[-1]
    _check_only_checkpoints(root)
    if complete_checkpoints(root) and not config.overwrite:
        raise PeftkitError(f"an interrupted run left checkpoints in {root}: pass --resume to continue it, "
                           "or --overwrite to start over")
    check_replaceable(output_dir, RUN_RECORD, config.overwrite, "run", "--output-dir")
    remove_checkpoints(output_dir)  # --overwrite: the old checkpoints go now, a finished run when replaced
    return None


def _check_only_checkpoints(root: Path) -> None:
    """A checkpoint folder peftkit may delete holds nothing but what runs put there."""
    if root.exists() and not root.is_dir():
        raise PeftkitError(f"{root} is a file, and a run keeps its checkpoints there: move it or choose another "
                           "--output-dir")
    if not root.is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir() if not _ours(p))
    if foreign:
        raise PeftkitError(f"{root} holds files that are not peftkit checkpoints ({', '.join(foreign[:3])}): peftkit "
                           "keeps a run's checkpoints there and never deletes other files; move them or choose "
                           "another --output-dir")


def _ours(entry: Path) -> bool:
    """Whether an entry of a checkpoint folder is one a run writes there."""
    if entry.name in (RUN_OPTIONS, STAGING):
        return True
    return entry.is_dir() and entry.name.startswith(PREFIX) and entry.name[len(PREFIX):].isdigit()


def remove_checkpoints(output_dir: Path) -> None:
    """A finished run's checkpoints go: what runs wrote in its checkpoint folder, then the
    folder if that left it empty (anything else put there stays)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if _ours(entry) and entry.is_dir():
            shutil.rmtree(entry)
        elif _ours(entry):
            entry.unlink()
    if not any(root.iterdir()):
        root.rmdir()


def record_options(config: RunConfig, output_dir: Path, commit: str) -> None:
    """Keep the options a fresh run trains with, and the code's commit, beside its checkpoints
    (for `--resume`, and for `peftkit compare`, which continues a cell only on the same code)."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / RUN_OPTIONS).write_text(json.dumps({**_options(config), CODE_KEY: commit}, indent=2) + "\n")


def _options(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in START_OPTIONS}


def save_atomically(trainer: Any, save: Callable[[], None], selection: Any = None,
                    progress: dict[str, Any] | None = None) -> None:
    """Run Trainer's checkpoint `save` into a staging folder, add the selection's state and the
    run's `progress` (Timed.progress), and rename the checkpoint into place (every rank of a
    distributed run waits for the others); then keep only the newest `save_total_limit`
    checkpoints."""
    import torch

    root = Path(trainer.args.output_dir)
    staging = root / STAGING
    name = f"{PREFIX}{trainer.state.global_step}"
    main = trainer.args.should_save
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.args.output_dir = str(staging)
    try:
        save()
    finally:
        trainer.args.output_dir = str(root)
    if main and selection is not None:
        torch.save(selection.state_dict(), staging / name / SELECTION_STATE)
    if main and progress is not None:
        (staging / name / PROGRESS).write_text(json.dumps(progress) + "\n")
    trainer.accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(root / name, ignore_errors=True)
        (staging / name).rename(root / name)
        shutil.rmtree(staging, ignore_errors=True)
        for old in complete_checkpoints(root)[:-trainer.keep_checkpoints]:
            shutil.rmtree(old)
    trainer.accelerator.wait_for_everyone()


def save_trainable(model: Any, directory: str) -> None:
    """The model's trainable tensors, by parameter name, into `directory`."""
    from safetensors.torch import save_file

    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().contiguous() for name, param in model.named_parameters() if param.requires_grad}
    save_file(tensors, str(Path(directory) / TRAINABLE))


def load_trainable(model: Any, directory: str) -> None:
    """Put a checkpoint's trainable tensors back into the model, refusing one made for another model."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / TRAINABLE))
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if tensors.keys() != params.keys():
        raise PeftkitError(f"checkpoint {directory} holds other trainable weights than this run's model: "
                           "start over with --overwrite")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def load_selection(selection: Any, checkpoint: Path) -> None:
    """Give the checkpoint selection the state it had when the checkpoint was written."""
    import torch

    path = checkpoint / SELECTION_STATE
    if path.is_file():
        selection.load_state_dict(torch.load(path))


def load_progress(checkpoint: Path) -> dict[str, Any]:
    """The training time, peak memory and process count the run had reached at `checkpoint`
    (a checkpoint from before they were kept counts as none)."""
    path = checkpoint / PROGRESS
    return {**NO_PROGRESS, **(json.loads(path.read_text()) if path.is_file() else {})}


def resumable(config: RunConfig, output_dir: Path, commit: str) -> bool:
    """Whether an interrupted run of exactly these options, by the code at `commit`, left a
    checkpoint to continue from."""
    root = checkpoint_root(output_dir)
    if not complete_checkpoints(root) or not (root / RUN_OPTIONS).is_file():
        return False
    return json.loads((root / RUN_OPTIONS).read_text()) == {**_options(config), CODE_KEY: commit}
