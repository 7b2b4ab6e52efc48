"""The layering is a rule the tests hold (docs/design.md section 2).

* Every module of ``utils/`` sits in a package by concern; the only flat files are the commands'
  shims (``python -m utils.write_beton`` ...), a few lines each.
* Package dependencies point one way, lazy imports included:
  core <- data, models <- runs <- pruning <- training <- lottery <- report <- launch <- harness*.py.
  The harness layer is imported only by the entry points, inside their command-line functions.
* No import cycle between modules (lazy imports included), in ``utils/`` and the harness layer.
* Below the harness layer only the modules whose job is a whole config (writing and comparing
  ``config.yaml``, storing it in a checkpoint, reading finished runs, expanding sweeps) take one;
  the others take narrow arguments or a typed view of one section (``PruneSettings``).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
UTILS = ROOT / "utils"
HARNESS_LAYER = {"harness", "harness_params", "harness_utils", "harness_setup"}
# lower first; a package may import its own modules and those of packages strictly below it
LAYERS = [{"core"}, {"data", "models"}, {"runs"}, {"pruning"}, {"training"}, {"lottery"}, {"report"}, {"launch"}]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
COMMAND_SHIMS = {"write_beton", "sweep", "compact", "pruning_utils", "single_gpu_harness", "ticket"}  # + utils/report/__main__.py
# modules that read a config the harness's way, inside their command-line functions only
ENTRY_POINTS = {"utils.pruning.command", "utils.report.experiments", "utils.launch.sweep_spec",
                "utils.launch.sweep", "utils.launch.single_process"}
# functions below the harness layer that take a whole config, and why that is their job
WHOLE_CONFIG = {
    "utils.runs.rundir": "writes, reads and compares config.yaml (the run directory's own file)",
    "utils.runs.checkpointing": "stores the resolved config in every checkpoint",
    "utils.training.training_types": "a training type rebuilds a level's optimizer and schedule from the config "
                                     "(its documented extension interface: optimizer_and_schedule, check)",
    "utils.pruning.settings": "builds the typed view of the prune section from a config",
    "utils.training.level_plan": "builds a run's plan from a config (through PruneSettings)",
    "utils.lottery.tickets": "exports a finished run: its config.yaml goes into the ticket file, and the model's "
                             "arguments are read from it",
}
CONFIG_PARAMETERS = {"config", "c", "resolved", "cfg"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files() -> List[Path]:
    return sorted(UTILS.rglob("*.py")) + [ROOT / f"{name}.py" for name in sorted(HARNESS_LAYER)]


MODULES: Dict[str, Path] = {module_name(path): path for path in python_files()}


def imports(tree: ast.AST) -> Iterator[Tuple[int, str, bool]]:
    """(line, module imported, at module level?) of every import of this project's code; ``from a.b
    import c`` names module ``a.b.c`` when that is a module, else ``a.b``."""
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                       for alias in node.names]
        for target in targets:
            if target.split(".")[0] in {"utils"} | HARNESS_LAYER:
                yield node.lineno, target, id(node) in top_level


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "utils" and len(parts) > 1 else parts[0]


def test_every_module_of_utils_sits_in_a_package_and_the_flat_files_are_command_shims():
    flat = {path.stem for path in UTILS.glob("*.py")} - {"__init__"}
    assert flat == COMMAND_SHIMS, f"flat modules in utils/ that are not command shims: {sorted(flat - COMMAND_SHIMS)}"
    for path in [UTILS / f"{name}.py" for name in COMMAND_SHIMS] + [UTILS / "report" / "__main__.py"]:
        text = path.read_text()
        assert len(text.splitlines()) <= 10 and "import main" in text, f"{path} is more than a shim"
    for package in {path.parent for path in UTILS.rglob("*.py")} - {UTILS}:
        init = package / "__init__.py"
        assert init.is_file(), f"{package} has no __init__.py"
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and "import" in docstring, f"{init} must say what the package owns and what it may import"
    assert set(RANK) == {path.name for path in UTILS.iterdir() if path.is_dir() and path.name != "__pycache__"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("utils.")))
def test_a_module_over_500_lines_says_why_it_is_one_concern(module):
    text = MODULES[module].read_text()
    if len(text.splitlines()) > 500:
        docstring = ast.get_docstring(ast.parse(text)) or ""
        assert "one concern" in docstring.lower(), f"{module} has {len(text.splitlines())} lines: split it, or say why it is one concern"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("utils.")))
def test_package_dependencies_point_one_way(module):
    mine = package_of(module)
    for line, target, top_level in imports(ast.parse(MODULES[module].read_text())):
        theirs = package_of(target)
        if theirs in HARNESS_LAYER:
            assert module in ENTRY_POINTS and not top_level, \
                f"{module}:{line} imports the harness layer ({target}); only an entry point may, inside a function"
        elif theirs != mine and mine in RANK:
            assert RANK[theirs] < RANK[mine], f"{module}:{line} ({mine}) imports {target} ({theirs}): upward"


def import_graph() -> Dict[str, Set[str]]:
    return {module: {target for _, target, _ in imports(ast.parse(path.read_text())) if target in MODULES
                     and target != module}
            for module, path in MODULES.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_lazy_imports_included():
    assert cycles(import_graph()) == []


def test_the_checks_find_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    code = "import os\nfrom utils.lottery.controls import read_source\ndef f():\n    import harness_params\n"
    found = [(target, top) for _, target, top in imports(ast.parse(code))]
    assert found == [("utils.lottery.controls", True), ("harness_params", False)]
    assert RANK[package_of("utils.lottery.controls")] > RANK[package_of("utils.pruning.masks")]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("utils.")))
def test_below_the_harness_layer_only_the_config_owners_take_a_whole_config(module):
    if module in WHOLE_CONFIG or package_of(module) in {"report", "launch"}:  # they read finished runs' and sweeps' configs
        return
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "from_config":  # a typed view's constructor
            names = {arg.arg for arg in node.args.args + node.args.kwonlyargs}
            assert not names & CONFIG_PARAMETERS, \
                (f"{module}.{node.name} takes a whole config ({sorted(names & CONFIG_PARAMETERS)}); take narrow "
                 f"arguments or a typed view of one section (utils.pruning.settings.PruneSettings)")


def structure_comparisons(tree: ast.AST) -> List[int]:
    """Lines comparing something named like a structure with a structure's name ("channel", "nm",
    "unstructured"): what asking the Structure object replaces."""
    names = {"unstructured", "channel", "nm"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(isinstance(side, ast.Constant) and side.value in names for side in sides)
            if not named:
                named = any(isinstance(side, (ast.Tuple, ast.List, ast.Set)) and
                            any(isinstance(e, ast.Constant) and e.value in names for e in side.elts) for side in sides)
            about = any("structure" in ast.unparse(side) for side in sides)
            if named and about:
                found.append(node.lineno)
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("utils.pruning.structures")))
def test_only_the_structures_compare_a_structure_name(module):
    lines = structure_comparisons(ast.parse(MODULES[module].read_text()))
    assert not lines, f"{module} compares a structure's name at lines {lines}; ask the Structure object"


def test_the_scan_finds_a_structure_comparison():
    code = 'if c["prune.structure"] == "channel":\n    pass\nif structure in ("nm", "x"):\n    pass\nif a == "nm":\n    pass\n'
    assert structure_comparisons(ast.parse(code)) == [1, 3]
