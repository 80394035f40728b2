"""The package's layers point one way: read from the code's own imports (module-level,
function-local and `TYPE_CHECKING` alike), no module of peftkit reaches itself again, and the
option schemas load neither torch nor transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peftkit"


def module_files() -> dict[str, Path]:
    """Every module of peftkit by dotted name (a package by its `__init__.py`)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(module: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The peftkit modules one import statement runs: the module named (or, for `from X import
    name`, X.name where that is a module) and every package above it, as Python does, except
    the importing module's own packages (Python runs those before the module itself)."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] +
                            ([node.module] if node.module else []))
        else:
            base = node.module or ""
        named = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for name in named:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in modules:
                found.add(prefix)
    own_packages = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 2)}
    return found - own_packages


def import_graph() -> dict[str, set[str]]:
    """Module -> the peftkit modules it imports, anywhere in its text."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _imported(name, node, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    graph = import_graph()
    circles = cycles(graph)
    described = ["; ".join(f"{m} -> {', '.join(sorted(t for t in graph[m] if t in group))}" for m in group)
                 for group in circles]
    assert not circles, "import cycles: " + " || ".join(described)


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_local_imports_do_not_repeat_top_level_ones():
    """A function-local import is for keeping a heavy library out of start-up; importing again
    a module the file already imports at its top says nothing and hides the real layering."""
    modules = module_files()
    repeated = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {target for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for target in _imported(name, node, modules)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        again = _imported(name, inner, modules) & top
                        named = {inner.module} if isinstance(inner, ast.ImportFrom) and inner.module else set()
                        if again & named:
                            repeated.append(f"{name}:{inner.lineno} {sorted(again & named)}")
    assert not repeated, repeated


def test_option_schemas_load_no_torch_or_transformers():
    code = ("import sys, peftkit.options; heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') "
            "if m in sys.modules]; print(heavy); raise SystemExit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate", "numpy", "matplotlib",
         "safetensors", "huggingface_hub", "rich", "evaluate", "seqeval", "optuna")


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """A module's imports that run when it is imported (not those under `if TYPE_CHECKING:`)."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        elif isinstance(node, ast.Try):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def test_function_local_imports_keep_a_heavy_library_out_of_start_up():
    """A function-local import of a peftkit module is only for a module that, imported, loads
    torch or another heavy library: anything lighter belongs at the top of the file."""
    modules = module_files()
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    heavy: dict[str, bool] = {}

    def loads_heavy(name: str, seen: frozenset = frozenset()) -> bool:
        if name not in heavy:
            nodes = _top_level_imports(trees[name])
            external = {(n.module or "") if isinstance(n, ast.ImportFrom) and not n.level else "" for n in nodes} | \
                       {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
            inner = {t for n in nodes for t in _imported(name, n, modules)} - seen - {name}
            heavy[name] = any(e.split(".")[0] in HEAVY for e in external) or \
                any(loads_heavy(t, seen | {name}) for t in inner)
        return heavy[name]

    light = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        targets = _imported(name, inner, modules) - {"peftkit"}
                        named = {t for t in targets if isinstance(inner, ast.ImportFrom) and t == inner.module or
                                 isinstance(inner, ast.Import)}
                        for target in named:
                            if not loads_heavy(target):
                                light.append(f"{name}:{inner.lineno} imports {target} inside a function")
    assert not light, light
