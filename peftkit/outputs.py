"""The directories peftkit writes (a run, a merged checkpoint), and replacing one safely.

Each is written into a staging folder beside its place and renamed there, so a failure
leaves nothing half-written; its record (run.json, merge.json) lists the entries it wrote.
`--overwrite` removes exactly those entries, and only from a directory whose record says it
is peftkit's: a directory that holds anything else is refused, flag or not, so a user's own
file is never deleted. Torch-free: the checks run before any library loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

from peftkit.errors import PeftkitError

FILES_KEY = "files"  # the record's list of the entries its directory holds
# what says a record file is peftkit's: run.json holds the run's config, merge.json what it merged into
RECORD_MARKERS = {"run.json": "config", "merge.json": "merged_into"}
# what a record from before FILES_KEY existed could have written beside it: weights and adapter
# files, configs, the tokenizer's files, the PEFT model card, a whole-model save's folder, answers
LEGACY_ENTRIES = ("adapter_model.safetensors", "adapter_config.json", "trained_weights.safetensors", "model",
                  "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
                  "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                  "spiece.model", "tokenizer.model", "chat_template.jinja", "predictions.jsonl")


def owned_entries(directory: Path, record_name: str) -> set[str] | None:
    """The entries of `directory` that its peftkit record says it wrote (the record
    included, and only entries that are really there, by plain name), or None where the
    directory holds no readable peftkit record."""
    try:
        record = json.loads((directory / record_name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or RECORD_MARKERS.get(record_name, FILES_KEY) not in record:
        return None
    present = {p.name for p in directory.iterdir()}
    listed = record.get(FILES_KEY)
    if isinstance(listed, list):
        return {name for name in map(str, listed) if name in present} | {record_name}
    return {name for name in present if any(fnmatch(name, pattern) for pattern in LEGACY_ENTRIES)} | {record_name}


def check_replaceable(directory: Path, record_name: str, overwrite: bool, what: str, option: str) -> None:
    """Refuse, in one line, to write `what` into a non-empty `directory` unless it holds
    only an earlier `what` of peftkit's and `overwrite` is set. `option` names the flag
    that chose the directory (--output-dir, --output)."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    owned = owned_entries(directory, record_name)
    foreign = sorted(p.name for p in directory.iterdir() if owned is None or p.name not in owned)
    if owned is None:
        raise PeftkitError(f"{option} {directory} is not empty and holds no peftkit {what} ({_names(foreign)}): "
                           f"peftkit never deletes files it did not write, --overwrite included; choose another {option}")
    if foreign:
        raise PeftkitError(f"{option} {directory} holds a peftkit {what} and files it did not write ({_names(foreign)}): "
                           f"--overwrite replaces only the {what}'s own files; move yours or choose another {option}")
    if not overwrite:
        raise PeftkitError(f"{option} {directory} holds a finished peftkit {what}: pass --overwrite to replace it, "
                           f"or choose another {option}")


def check_writable(directory: Path, option: str) -> None:
    """Refuse, before anything loads, a `directory` that cannot be created or written: the
    nearest existing folder on its path must take a new entry (a read-only filesystem, a
    folder without write permission, a file in the way)."""
    directory = Path(directory)
    blocking = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PeftkitError(f"{option} {directory}: {blocking} is a file, not a directory: choose another {option}")
    beside = next(p for p in directory.absolute().parents if p.exists())  # where staging and checkpoints go
    for existing in ([directory] if directory.exists() else []) + [beside]:
        try:
            probe = tempfile.mkdtemp(prefix=".peftkit-write-check-", dir=existing)
        except OSError as err:
            raise PeftkitError(f"{option} {directory}: cannot write in {existing} ({err.strerror}): "
                               f"choose another {option}") from None
        os.rmdir(probe)


def write_directory(output_dir: Path, write: Callable[[Path], None], record_name: str) -> None:
    """`write` fills a fresh staging folder beside `output_dir` (its record `record_name`
    last); the record then lists what was written, every file is made readable as the
    umask allows, and the folder takes `output_dir`'s place, replacing only the entries an
    earlier record there listed. A failure leaves nothing half-written."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        write(staging)
        _list_entries(staging, record_name)
        _readable_as_umask_allows(staging)
        _replace(output_dir, staging, record_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _list_entries(staging: Path, record_name: str) -> None:
    path = staging / record_name
    record = json.loads(path.read_text())
    record[FILES_KEY] = sorted(p.name for p in staging.iterdir())
    path.write_text(json.dumps(record, indent=2) + "\n")


def _readable_as_umask_allows(staging: Path) -> None:
    """Some writers (safetensors through a temporary file) leave 0600 files: give every
    file and folder the mode a plain `open` would (0666 / 0777 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(output_dir: Path, staging: Path, record_name: str) -> None:
    """Put the staged entries at `output_dir`: remove only what an earlier record there
    listed; where anything else remains (a file put there meanwhile), move the new entries in
    beside it, or, where one would take the name of a file peftkit did not write, keep the
    new output under a name of its own and say so."""
    if output_dir.is_dir():
        owned = owned_entries(output_dir, record_name) or set()
        taken = sorted(p.name for p in staging.iterdir() if (output_dir / p.name).exists() and p.name not in owned)
        if taken:
            kept = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.new-", dir=output_dir.parent))
            kept.rmdir()
            staging.rename(kept)
            raise PeftkitError(f"{output_dir} now holds files peftkit did not write ({', '.join(taken[:3])}): "
                               f"they are kept, and this output is in {kept} instead")
        for name in owned_entries(output_dir, record_name) or ():
            old = output_dir / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
        if not any(output_dir.iterdir()):
            output_dir.rmdir()
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    for entry in staging.iterdir():
        os.replace(entry, output_dir / entry.name)


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
