"""Dependencies point one way: harness*.py -> utils/.  A library module of utils/ never imports
the harness layer; the entry points named here may, inside their command-line functions only
(to read a config the harness's way), never at module level."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

UTILS = Path(__file__).resolve().parents[1] / "utils"
HARNESS_LAYER = {"harness", "harness_params", "harness_utils", "harness_setup"}
ENTRY_POINTS = {"sweep", "single_gpu_harness", "pruning_cli", "report", "compact"}


def harness_imports(tree: ast.AST):
    """(line, module, at module level?) of every import of the harness layer."""
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in HARNESS_LAYER:
                yield node.lineno, name, id(node) in top_level


@pytest.mark.parametrize("path", sorted(UTILS.glob("*.py")), ids=lambda p: p.stem)
def test_utils_module_does_not_import_the_harness_layer(path):
    found = list(harness_imports(ast.parse(path.read_text())))
    if path.stem in ENTRY_POINTS:
        assert not [f for f in found if f[2]], f"{path.name} imports the harness layer at module level: {found}"
    else:
        assert not found, f"{path.name} (a library module) imports the harness layer: {found}"


def test_the_scan_finds_an_import_of_the_harness_layer():
    code = "import os\nfrom harness_params import load_config\ndef main():\n    import harness_utils as hu\n"
    assert [(n, top) for _, n, top in harness_imports(ast.parse(code))] == [("harness_params", True),
                                                                         ("harness_utils", False)]
