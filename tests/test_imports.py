"""The folder shows the flow (STYLE.md): pipeline_core's modules import one way, from the layers below, never in a
circle and never back up. Read from the source, every import counted, those inside functions and for typing too.

The layers, low to high: the base (errors, signals, logs, remote, layout, the Task contract) -> the manifest -> the
identity's keys -> the run directory and its storage (output/: it knows no data, model or task) -> reading and
preparing data -> the initializer -> the tasks -> the job's identity and provenance, execution, evaluation -> this
process's share of the work -> the runner -> the commands (status, report, cli) -> entry.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline_core"

LAYERS = [
    ("pipeline_core", "pipeline_core.errors", "pipeline_core.remote", "pipeline_core.signals", "pipeline_core.logs",
     "pipeline_core.heap", "pipeline_core.layout", "pipeline_core.tasks.base"),
    ("pipeline_core.manifest*",),
    ("pipeline_core.identity", "pipeline_core.identity.keys"),
    ("pipeline_core.output*",),
    ("pipeline_core.data*",),
    ("pipeline_core.initializer*",),
    ("pipeline_core.tasks*",),
    ("pipeline_core.identity*", "pipeline_core.execute", "pipeline_core.evaluation"),
    ("pipeline_core.engines*",),
    ("pipeline_core.work",),
    ("pipeline_core.runner",),
    ("pipeline_core.status", "pipeline_core.report", "pipeline_core.cli"),
    ("pipeline_core.entry", "pipeline_core.__main__"),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer(name: str) -> int:
    """The layer of the most specific entry that names the module (`x*`: x and everything below it)."""
    best, length = None, -1
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            prefix = entry.removesuffix("*")
            matches = name == prefix or entry.endswith("*") and name.startswith(prefix + ".")
            if matches and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_in_a_circle():
    assert cycles(graph()) == []


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{source} -> {target}" for source, targets in graph().items() for target in sorted(targets)
              if layer(target) > layer(source)]
    assert upward == []


def test_the_check_finds_a_circle_and_an_import_back_up():
    """The two checks above can fail: a made-up graph with a circle, and the loader importing a task."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer("pipeline_core.tasks.text") > layer("pipeline_core.data.loader")
    assert layer("pipeline_core.tasks.base") < layer("pipeline_core.data.loader")
    assert layer("pipeline_core.identity.keys") < layer("pipeline_core.output.run_dir")
    assert layer("pipeline_core.identity.provenance") > layer("pipeline_core.data.files")


def test_no_module_but_the_run_directory_spells_a_run_file():
    """The run's file names live in output/run_dir.py alone: every other module asks it for them."""
    names = ("_batchrun.json", "_progress.json", "_SUCCESS", "_eval.json", "_metrics-", ".worker-", ".claim-",
             "part-{")
    spelt = []
    for name, path in modules().items():
        if name == "pipeline_core.output.run_dir":
            continue
        source = path.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _docstring(node, tree):
                spelt += [f"{name}: {node.value!r}" for spelling in names if spelling in node.value]
    assert spelt == []


def _docstring(node: ast.Constant, tree: ast.Module) -> bool:
    """Whether a string constant is a docstring (which may name files in words), not a name in code."""
    for parent in ast.walk(tree):
        body = getattr(parent, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and body[0].value is node:
            return True
    return False
