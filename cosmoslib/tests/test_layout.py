"""The package layout: imports point down the layers, and local imports are the named exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]

#: Layer of each top-level name of cosmoslib (ARCHITECTURE.md, "Layers").
LAYERS = {"__init__": 0, "__version__": 0, "paths": 0, "files": 0, "allocator": 0, "vocabulary": 0, "strategies": 0, "masks": 0,
          "data": 1, "models": 2, "protocol": 3, "analysis": 4, "book": 5, "cli": 6}

#: Function-local imports allowed, each for a stated reason (optional extras, one import circle).
LOCAL_IMPORTS_ALLOWED = {"IPython.display", "papermill", "py_sod_metrics", "onnxruntime", "openvino", "onnx", "nncf",
                         "cosmoslib.protocol", "cosmoslib.book", "sam2", "sam2.utils.transforms", "hydra", "hydra.utils",
                         "omegaconf"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "tests" not in p.relative_to(PACKAGE).parts)


def _layer(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "cosmoslib":
        return None
    if len(parts) == 1:
        return 0
    return LAYERS[parts[1]]


def _own_layer(path: Path) -> int:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return LAYERS[rel.parts[0]]


def _imported(node) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "cosmoslib":
            return [f"cosmoslib.{a.name}" for a in node.names]
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def test_every_module_sits_in_a_known_layer():
    for path in _modules():
        assert path.relative_to(PACKAGE).with_suffix("").parts[0] in LAYERS, path


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    own = _own_layer(path)
    upward = []
    for node in ast.walk(ast.parse(path.read_text())):
        for target in _imported(node):
            layer = _layer(target)
            if layer is not None and layer > own:
                upward.append(f"line {node.lineno}: {target} (layer {layer} > {own})")
    assert not upward, f"{path.name} imports upward: {upward}"


def test_local_imports_are_only_the_named_exceptions():
    found = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for func in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                for target in _imported(node):
                    line = lines[node.lineno - 1]
                    comment = "#" in line or "#" in lines[node.lineno - 2]
                    if target not in LOCAL_IMPORTS_ALLOWED or not comment:
                        found.append(f"{path.name}:{node.lineno} {target}")
    assert not found, f"function-local imports without an allowed reason: {found}"


def test_the_checker_sees_an_upward_import(tmp_path):
    # The layer check must be able to fail: a data module importing the book layer is caught.
    bad = ast.parse("from cosmoslib.book import chapters\n")
    targets = [t for node in ast.walk(bad) for t in _imported(node)]
    assert [_layer(t) for t in targets] == [5] and 5 > LAYERS["data"]
