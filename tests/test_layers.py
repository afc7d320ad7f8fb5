"""The package's import layers: every import in src/tdm (module level, inside functions, under TYPE_CHECKING)
runs to the same or a lower layer, and the tdm modules import each other without a loop.

Parsed with `ast`, so nothing is imported and lazy imports count as much as the ones at the top of a file."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The architecture, bottom first. A module belongs to the layer of its longest listed prefix; it may import its own
# layer and the ones below. A new module gets a place here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("the method, pure torch", ("tdm.core",)),
    ("leaves: errors, files, optional imports, sample-set distances",
     ("tdm", "tdm.errors", "tdm.files", "tdm.optional", "tdm.metrics", "tdm.preemption", "tdm.diagnostics",
      "tdm.cpu_threads", "tdm.launch", "tdm.collectives", "tdm.tracking", "tdm.processes", "tdm.meta_init")),
    ("prompts and embedding caches; run folders, checkpoints, pictures",
     ("tdm.data", "tdm.checkpoint", "tdm.run_lock", "tdm.output_dirs", "tdm.divergence", "tdm.train_state",
      "tdm.report")),
    ("teacher families behind the Backbone interface", ("tdm.backbones",)),
    ("toy teachers on the same interface", ("tdm.toys",)),
    ("the application's config and the flags derived from it", ("tdm.config", "tdm.config_change", "tdm.resume",
                                                             "tdm.flags", "tdm.optimizers")),
    ("backbone.name -> family", ("tdm.registry",)),
    ("what training, evaluation and export share: step inputs, roles, samplers, the scheduler, opening a run",
     ("tdm.step_conditioning", "tdm.roles", "tdm.sharding", "tdm.samplers", "tdm.scheduler", "tdm.stock_scheduler",
      "tdm.runs", "tdm.validation")),
    ("the tasks: train, export, generate, evaluate, score (rewards)",
     ("tdm.trainer", "tdm.export", "tdm.network_export", "tdm.lora_files", "tdm.model_card", "tdm.hub",
      "tdm.generate", "tdm.evaluate", "tdm.plan", "tdm.rewards", "tdm.reward_stage")),
    ("the command line", ("tdm.cli",)),
]

# Imports the layer order alone would allow but the design forbids (importer prefix, imported prefixes).
FORBIDDEN: list[tuple[str, tuple[str, ...]]] = [
    ("tdm.trainer", ("tdm.evaluate",)),
    ("tdm.backbones", ("tdm.toys", "tdm.registry", "tdm.config", "tdm.trainer", "tdm.cli", "tdm.evaluate")),
    ("tdm.toys", ("tdm.evaluate", "tdm.registry")),
    ("tdm.rewards", ("tdm.trainer", "tdm.cli")),
    ("tdm.reward_stage", ("tdm.evaluate", "tdm.cli")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name an import statement in `path` reaches: `import a.b` -> a.b; `from .x import y` -> the
    resolved x and x.y (y may be a submodule)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def _import_graph(src: Path = SRC) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(tdm module -> tdm modules it imports, tdm module -> top-level names of the other packages it imports)."""
    files = {_module_name(p): p for p in sorted((src / "tdm").rglob("*.py"))}
    graph, external = {}, {}
    for module, path in files.items():
        names = _imported_names(path, module)
        graph[module] = {_longest_prefix(n, files) for n in names if n == "tdm" or n.startswith("tdm.")} - {module}
        external[module] = {n.split(".")[0] for n in names if n.split(".")[0] != "tdm"}
    return graph, external


def _longest_prefix(name: str, candidates) -> str | None:
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in candidates), None)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    owners = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if _within(module, p)]
    return max(owners)[1] if owners else None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or through others (not `start` itself unless it is on a loop)."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        if (node := todo.pop()) not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops, each as the sorted group of modules that reach one another."""
    reach = {node: _reachable(graph, node) for node in graph}
    return sorted({tuple(sorted(m for m in reach[n] if n in reach.get(m, ()))) for n in graph if n in reach[n]})


GRAPH, EXTERNAL = _import_graph()


def test_the_graph_sees_lazy_and_relative_imports():
    # registry builds families on demand; the CLI imports the trainer inside its command functions
    assert "tdm.toys.gmm" in GRAPH["tdm.registry"] and "tdm.trainer" in GRAPH["tdm.cli"]
    assert GRAPH["tdm.core.sampling"] >= {"tdm.core.prediction", "tdm.core.schedules"}


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if _layer(m) is None] == []


def test_imports_run_to_the_same_or_a_lower_layer():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert upward == []


@pytest.mark.parametrize("importer, banned", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_forbidden_imports(importer, banned):
    found = [f"{m} imports {d}" for m, deps in sorted(GRAPH.items()) if _within(m, importer)
             for d in sorted(deps) if any(_within(d, b) for b in banned)]
    assert found == []


def test_core_imports_only_torch_the_standard_library_and_itself():
    core = {m: (GRAPH[m], EXTERNAL[m]) for m in GRAPH if _within(m, "tdm.core")}
    assert core, "no tdm.core modules found"
    assert {m: sorted(d for d in deps if not _within(d, "tdm.core")) for m, (deps, _) in core.items()} \
        == {m: [] for m in core}
    assert {m: sorted(e - set(sys.stdlib_module_names) - {"torch"}) for m, (_, e) in core.items()} \
        == {m: [] for m in core}


def test_no_import_loops():
    assert _loops(GRAPH) == []


def test_the_loop_finder_finds_every_loop():
    assert _loops({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}) \
        == [("a", "b", "c"), ("d", "e")]
    assert _loops({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
