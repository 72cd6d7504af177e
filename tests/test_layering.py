"""The import graph of `src/delia`: no cycle, and no module imports a module of a higher layer.

Edges come from the source (AST): every `import delia.x`, `from delia.x import y`, `from delia import x` and relative
import, at module level or inside a function. An import names the module it imports: `from delia.training.config
import X` is an edge to `delia.training.config`, not to the package `delia.training` (as import-linter's graph
counts them). That a package's `__init__` also runs on such an import is checked at run time instead:
`test_every_module_imports_on_its_own` imports each module in a fresh interpreter state.

Every module is placed in exactly one layer below; a new module fails `test_every_module_has_a_layer` until it is.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top: a module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", [
        "delia", "delia.errors", "delia.text", "delia.progress", "delia.versions", "delia.files", "delia.config",
        "delia.artifacts", "delia.stage", "delia.compute", "delia.frontier",
    ]),
    ("upstream patches", [
        "delia.patches", "delia.patches.quiet_loading", "delia.patches.typer_usage", "delia.patches.typer_errors",
        "delia.patches.trl_label_positions", "delia.patches.peft_mask_dropout", "delia.patches.peft_head_bias",
        "delia.patches.token_rows_decay",
    ]),
    ("shared pieces", [  # prompts, tokens, filters and metrics; the names of what a training run writes
        "delia.prompts", "delia.tokens", "delia.filters", "delia.metrics", "delia.important", "delia.training.config",
    ]),
    ("data and models", [
        "delia.models", "delia.data", "delia.backends.base", "delia.backends.hf", "delia.backends.vllm",
        "delia.backends.openai", "delia.backends", "delia.general", "delia.demo_data", "delia.task_data",
    ]),
    ("stages", [
        "delia.pool", "delia.coverage", "delia.sample", "delia.mix", "delia.rewrite", "delia.training",
        "delia.training.trainer", "delia.training.checkpoints", "delia.training.anchor", "delia.training.token_rows",
        "delia.evaluate", "delia.probe",
    ]),
    ("orchestration", ["delia.experiment", "delia.plan", "delia.run", "delia.report", "delia.demo"]),
    ("command line", ["delia.cli", "delia.__main__"]),
]


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the `delia` package under `src`."""
    found = {}
    for path in sorted((src / "delia").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The `delia` modules that module `name` (at `path`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from delia import cli` imports the module delia.cli
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if (m == "delia" or m.startswith("delia.")) and m != name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    files = module_files(src)
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    unknown = {f"{m} -> {d}" for m, deps in graph.items() for d in deps if d not in graph}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the list of its modules (the first repeated at the end), or None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]] = LAYERS) -> list[str]:
    """Every import of a module in a higher layer than the importer's, as 'importer (layer) -> imported (layer)'."""
    level = {m: (i, layer) for i, (layer, modules) in enumerate(layers) for m in modules}
    return sorted(f"{m} ({level[m][1]}) -> {d} ({level[d][1]})" for m, deps in graph.items() for d in deps
                  if m in level and d in level and level[d][0] > level[m][0])


def test_every_module_has_a_layer():
    placed = [m for _, modules in LAYERS for m in modules]
    assert len(placed) == len(set(placed)), "a module is placed in two layers"
    assert set(module_files()) - set(placed) == set(), "place each new module in LAYERS"
    assert set(placed) - set(module_files()) == set(), "LAYERS names a module that no longer exists"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_the_checks_find_a_planted_cycle_and_a_planted_upward_import(tmp_path):
    """The graph, cycle and layer checks catch an import added to a copy of the source, even inside a function."""
    copy = tmp_path / "src"
    for path in module_files().values():
        target = copy / path.relative_to(SRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    errors = copy / "delia" / "errors.py"
    errors.write_text(errors.read_text(encoding="utf-8") + "\n\ndef _planted():\n    from delia import files\n")
    graph = import_graph(copy)
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"delia.errors", "delia.files"} and cycle[0] == cycle[-1]
    assert upward_imports(graph) == []  # errors and files share a layer: only the cycle is wrong
    errors.write_text(errors.read_text(encoding="utf-8") + "\n\ndef _also_planted():\n    import delia.cli\n")
    graph = import_graph(copy)
    assert "delia.errors (foundation) -> delia.cli (command line)" in upward_imports(graph)
    assert find_cycle(graph) is not None


def test_relative_imports_resolve_to_the_module_they_name(tmp_path):
    pkg = tmp_path / "delia" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "delia" / "__init__.py").write_text("")
    (tmp_path / "delia" / "errors.py").write_text("")
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import x\nfrom .. import errors\nfrom ..errors import E\n")
    (pkg / "b.py").write_text("x = 1\n")
    graph = import_graph(tmp_path)
    assert graph["delia.sub"] == {"delia.sub.a"}
    assert graph["delia.sub.a"] == {"delia.sub.b", "delia.errors"}


_IMPORT_EACH = """
import importlib, json, sys
sys.path.insert(0, sys.argv[2])
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "delia" or m.startswith("delia.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module imports first, in an interpreter where no delia module is loaded yet: no module-level import
    meets a module that is still half-initialised (a cycle through a package's `__init__` included)."""
    names = sorted(set(module_files()) - {"delia.__main__"})  # importing it runs the command
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names), str(SRC)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def test_the_cli_reaches_every_stage_through_plain_imports():
    """`delia train` and every other verb resolve through imports the graph sees, not strings."""
    stages = {"delia.training", "delia.pool", "delia.sample", "delia.mix", "delia.evaluate", "delia.run"}
    assert stages <= import_graph()["delia.cli"]
