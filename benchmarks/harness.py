"""What every benchmark script beside this file repeats, written once.

    from harness import FreshProcessError, command_line, in_fresh_process, one_clean_commit, stamp, write_result

- `in_fresh_process(function, *args, **kwargs)` calls a module-level function of a benchmark
  script in a new Python process and returns what it returned (as JSON gives it back): each
  measurement starts from a process no earlier one touched (its own peak memory, allocator
  state, imports and caches). No script re-runs itself through a hidden flag.
- `command_line(__file__)` is the command that is running, as typed from the repository root
  (`python benchmarks/<script>.py ARGS`, shell-quoted): what a result says made it.
- `write_result(out, command, markdown, data)` writes `OUT.md` (which must name the command)
  and `OUT.json` (`{"command": ..., **data}`): a result and the command that made it, together.
- `stamp()` and `one_clean_commit(rows, fix)`: where a row was measured (commit, date,
  machine, uncommitted changes), and the rule every published table follows: all of its rows
  come from one commit with no uncommitted changes to peftkit or to these scripts.

Imported by the scripts in this folder (`python benchmarks/<script>.py` puts it on the import
path; `gpu/check.py` adds it). Imports nothing heavy (no torch, no peftkit at import time), so a
fresh process starts as light as the measurement allows. Run as a script it is the child of
`in_fresh_process`: `python benchmarks/harness.py CALL` loads the script the call names and
runs the function.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pickle
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class FreshProcessError(RuntimeError):
    """A function run by `in_fresh_process` failed (its process exited non-zero, or returned
    nothing); `last_line` is the last line of its error output, for a one-line message."""

    def __init__(self, function: str, returncode: int, last_line: str) -> None:
        super().__init__(f"{function} failed in a fresh process (exit status {returncode}): {last_line}")
        self.function, self.returncode, self.last_line = function, returncode, last_line


def in_fresh_process(function: Callable[..., Any], *args: Any, env: Mapping[str, str] | None = None,
                     quiet: bool = True, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` in a new Python process; its return value, through JSON.

    `function` must be defined at the top level of a script file (it is loaded by name in the
    child, from that file, with the file's folder first on the import path, as `python
    <script>` would have it); arguments are pickled (str, Path, numbers, lists, dicts, ...), the
    result must be JSON-serialisable. `env` adds to this process's environment. `quiet`
    captures the child's output (shown only through `FreshProcessError.last_line`); with
    `quiet=False` it goes to this process's stdout and stderr. Raises `FreshProcessError` when the
    child fails."""
    source = inspect.getsourcefile(function)
    if source is None or "." in function.__qualname__ or "<" in function.__qualname__:
        raise ValueError(f"{function!r} is not a top-level function of a script file")
    with tempfile.TemporaryDirectory(prefix="peftkit-benchmark-") as scratch:
        call, result = Path(scratch) / "call.pickle", Path(scratch) / "result.json"
        call.write_bytes(pickle.dumps({"script": str(Path(source).resolve()), "function": function.__qualname__,
                                       "args": args, "kwargs": kwargs, "result": str(result)}))
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(call)],
                              env={**os.environ, **(env or {})}, capture_output=quiet, text=True)
        if done.returncode != 0 or not result.is_file():
            lines = (done.stderr or "").strip().splitlines()
            raise FreshProcessError(function.__qualname__, done.returncode, lines[-1] if lines else "no output")
        return json.loads(result.read_text())


def _run_call(call_path: Path) -> None:
    """The child's side of `in_fresh_process`: load the script, call the function, write its result."""
    call = pickle.loads(call_path.read_bytes())
    script = Path(call["script"])
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    assert spec is not None and spec.loader is not None, script
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # not as __main__: the script's own main() does not run
    value = getattr(module, call["function"])(*call["args"], **call["kwargs"])
    Path(call["result"]).write_text(json.dumps(value))


def command_line(script: str | os.PathLike[str], argv: Iterable[str] | None = None) -> str:
    """The running command as typed from the repository root: `python <script> <arguments>`,
    the script's path relative to the root (absolute outside it), the arguments (default
    `sys.argv[1:]`) shell-quoted."""
    path = Path(script).resolve()
    shown = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
    return shlex.join(["python", shown, *(sys.argv[1:] if argv is None else argv)])


def write_result(out: Path, command: str, markdown: str | Iterable[str] | None = None,
                 data: Mapping[str, Any] | list[Any] | None = None) -> list[Path]:
    """Write `OUT.md` and `OUT.json` (whatever suffix `out` has is replaced), their folder made
    if missing; returns the paths written.

    `markdown` (a text, or lines joined with newlines and ended with one) must name `command`;
    `data` is written as `{"command": command, **data}`, a list as `{"command": command, "rows":
    data}`. Either left None is not written (a resumable script saves its JSON as rows finish,
    its Markdown once they all have)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if markdown is not None:
        text = markdown if isinstance(markdown, str) else "\n".join(markdown) + "\n"
        if command not in text:
            raise ValueError(f"the Markdown for {out} does not name the command that made it: {command}")
        written.append(out.with_suffix(".md"))
        written[-1].write_text(text)
    if data is not None:
        body = {"command": command, **(data if isinstance(data, Mapping) else {"rows": data})}
        written.append(out.with_suffix(".json"))
        written[-1].write_text(json.dumps(body, indent=1) + "\n")
    return written


def stamp() -> dict[str, Any]:
    """What a row records about where it was measured: commit, date, machine, and whether peftkit
    or a benchmark script had uncommitted changes (results written meanwhile do not count)."""
    from peftkit.provenance import code_version

    version = code_version()
    scripts = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
                             capture_output=True, text=True)
    dirty = version["dirty"] if version["dirty"] is None else version["dirty"] or bool(scripts.stdout.strip())
    return {**version, "dirty": dirty, "date": date.today().isoformat(), "machine": platform.platform()}


def one_clean_commit(rows: list[dict[str, Any]], fix: str) -> str:
    """The commit every row names; exits with one line (ending in `fix`) when the rows name
    several commits or any was measured on a tree with uncommitted changes."""
    commits = {(r["commit"], r["dirty"]) for r in rows}
    if len(commits) != 1 or next(iter(commits))[1]:
        sys.exit(f"error: the rows were measured on different or uncommitted code {sorted(commits)}: {fix}")
    return rows[0]["commit"]


if __name__ == "__main__":
    _run_call(Path(sys.argv[1]))
