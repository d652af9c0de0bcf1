"""The package's layering, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` in ``flowalign/`` counts, at module level and inside functions,
relative imports resolved. A module may import its own layer and the layers below it; the graph of
modules must have no cycle. Modules stay under 500 lines and functions under 80, except the few named
in ``EXCEPTIONS`` with their reason.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flowalign"

# Bottom to top. A module's layer is that of its first name under ``flowalign`` (``flowalign.models.sd3``
# -> "models"); the package's own ``__init__`` is in the bottom layer, ``__main__`` on top.
LAYERS: list[tuple[str, ...]] = [
    (
        "__init__",
        "flow",
        "formats",
        "files",
        "validation",
        "sharding",
        "config_types",
        "config",
    ),  # conventions, file rules, typed config values, the config loader and the training configs
    ("objectives", "data"),  # pure losses; media, tables, prompts, preference pairs
    ("toy",),  # the toy world: scenes, renders, language, exact oracles, toy datasets, metrics
    ("models",),  # model families (the toy family builds its vocabulary from toy.world), LoRA, time grids
    ("sampling", "rewards", "tokenizers"),
    ("pipelines",),
    ("training",),
    ("planning",),  # memory plans from the published architectures and the training recipes
    ("workflows",),  # sample -> score -> pair
    ("evals",),
    ("sharing",),  # model cards and the push of a run to the Hub
    ("experiments",),  # the toy experiments and the demo
    ("cli", "__main__"),
]

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# "module" or "module:function" (names without the "flowalign." prefix) -> why it is longer today.
# Each one is a known item to split; the test fails once an entry is no longer needed.
_ORCHESTRATION = "one long orchestration function: to split into setup, steps and write-out"
EXCEPTIONS: dict[str, str] = {
    # modules
    # functions
    "cli.generate:generate": "a Typer command: 35 of its lines are the option declarations (the --help texts)",
    "config_types:_coerce": "one type dispatch over every annotation the config loader accepts",
    "data.preference_jsonl:write_preference_jsonl": "27 lines of docstring (the row format); the rest is one loop",
    "evals.runner:run_eval": _ORCHESTRATION,
    "evals.summary:_summarise_set": _ORCHESTRATION,
    "objectives.bt_ties:btt_loss": "34 lines of docstring with the BTT equations; the computation is short",
    "rewards.scoring:score_files": _ORCHESTRATION,
    "rewards.videoreward:load_videoreward": "resolves and checks the checkpoint, config and processor in one",
    "tokenizers.files:reconstruct_files": "reconstruction with its metrics and write-out in one function",
    "toy.oracles:_detect_chunk": "the detector's per-chunk template fit (one over the limit)",
    "toy.reward_pairs:build_toy_reward_pairs": "renders, scores and labels pairs in one chunked loop",
    "training.cache:build_cache": _ORCHESTRATION,
    "training.checkpoint:save_checkpoint": "writes every part of a checkpoint atomically in one function",
}

# Imports left out of the cycle check, each with its reason (each one is an item to remove).
CYCLE_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(name: str) -> ast.Module:
    path = _modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def _existing(name: str) -> str | None:
    """The longest prefix of a dotted name that is a module of the package."""
    while name and name not in _modules():
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name if _modules()[name].name == "__init__.py" else name.rpartition(".")[0]
    return _imports_in(_tree(name), package) - {name}


def _imports_in(tree: ast.Module, package: str) -> set[str]:
    """Modules of the package imported anywhere in ``tree``, relative imports resolved from ``package``."""
    out: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(_existing(a.name) for a in node.names if a.name.split(".")[0] == "flowalign")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "flowalign":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in _modules() else _existing(target))
    out.discard(None)
    return out  # type: ignore[return-value]


def _layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if key in names:
            return index
    raise AssertionError(f"{name}: {key!r} is in no layer of LAYERS; add it to tests/test_layout.py")


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name) for name in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One import loop inside a strongly connected component, as "a -> b -> ... -> a"."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first back to start
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    loop = [node]
                    while loop[-1] != start:
                        loop.append(parents[loop[-1]])
                    return " -> ".join([*reversed(loop), start])
                if child not in seen:
                    seen.add(child)
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return " -> ".join(path)


def test_every_module_is_in_a_layer():
    for name in _modules():
        _layer(name)


def test_imports_point_down_the_layers():
    wrong = [
        f"{name} ({LAYERS[_layer(name)][0]}...) imports {target} ({LAYERS[_layer(target)][0]}...)"
        for name, targets in _graph().items()
        for target in sorted(targets)
        if _layer(target) > _layer(name)
    ]
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def _graph_without_exceptions() -> dict[str, set[str]]:
    graph = _graph()
    for source, target in CYCLE_EXCEPTIONS:
        graph[source] = graph[source] - {target}
    return graph


def test_no_import_cycles():
    graph = _graph_without_exceptions()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_path(graph, c) for c in cycles)


def test_cycle_exceptions_are_still_needed():
    """Each excepted import exists and still closes a cycle (else remove it from CYCLE_EXCEPTIONS)."""
    graph = _graph_without_exceptions()
    for source, target in CYCLE_EXCEPTIONS:
        assert target in _graph()[source], f"{source} no longer imports {target}"
        with_edge = {**graph, source: graph[source] | {target}}
        assert any(source in c and target in c for c in _cycles(with_edge)), f"{source} -> {target}"


def _sizes() -> dict[str, int]:
    """Line counts of every module ("models.sd3") and function ("models.sd3:name", nested by dots)."""
    sizes: dict[str, int] = {}

    def visit(module: str, node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    sizes[f"{module}:{qual}"] = child.end_lineno - child.lineno + 1
                visit(module, child, qual + ".")
            else:
                visit(module, child, prefix)

    for name, path in _modules().items():
        short = name.removeprefix("flowalign.")
        sizes[short] = len(path.read_text().splitlines())
        visit(short, _tree(name), "")
    return sizes


@pytest.mark.parametrize("kind", ["module", "function"])
def test_sizes_within_limits(kind):
    limit = MAX_MODULE_LINES if kind == "module" else MAX_FUNCTION_LINES
    long = {
        key: n
        for key, n in _sizes().items()
        if (":" in key) == (kind == "function") and n > limit and key not in EXCEPTIONS
    }
    assert not long, f"{kind}s over {limit} lines (split them or name them in EXCEPTIONS): {long}"


def test_exceptions_are_still_needed():
    sizes = _sizes()
    stale = [
        key
        for key in EXCEPTIONS
        if sizes.get(key, 0) <= (MAX_FUNCTION_LINES if ":" in key else MAX_MODULE_LINES)
    ]
    assert not stale, f"EXCEPTIONS names items that are within the limits or gone, remove them: {stale}"


def test_the_checks_catch_what_they_claim():
    """The cycle finder and the path printer on a small graph; the layer map on known names."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycle_path(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    assert _layer("flowalign.flow") < _layer("flowalign.models.sd3") < _layer("flowalign.cli")
    snippet = ast.parse(
        "from ..flow import t_from_draws\n"
        "def f():\n"
        "    from . import lora\n"
        "    import flowalign.toy.world as w\n"
        "    from flowalign.evals import metrics, run_eval\n"
    )
    assert _imports_in(snippet, "flowalign.models") == {
        "flowalign.flow",
        "flowalign.models.lora",
        "flowalign.toy.world",
        "flowalign.evals.metrics",
        "flowalign.evals",
    }


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (the test folders are not packages): two files of one
    name in different folders stop the whole collection."""
    tests = Path(__file__).resolve().parent
    names: dict[str, list[str]] = {}
    for path in tests.rglob("*.py"):
        if path.name != "conftest.py":
            names.setdefault(path.name, []).append(str(path.relative_to(tests)))
    clashes = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"
