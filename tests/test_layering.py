"""The library's rooms only look down: kernels < models < storage < convert < data < train < plan < the front door."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mambaout_jax"
# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = ("kernels", "models", "storage", "convert", "data", "train", "plan")
FRONT = len(LAYERS)  # mambaout_jax/*.py: the public API and the entry points built on the layers


def layer_of(module: str) -> int:
    """The layer of a dotted module name inside the package (``mambaout_jax.train.steps`` -> 5)."""
    parts = module.split(".")
    assert parts[0] == "mambaout_jax", module
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return FRONT


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a mambaout_jax module."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("mambaout_jax"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("mambaout_jax"):
                if child.module == "mambaout_jax":  # `from mambaout_jax import data`: the names are modules or the API
                    names = [f"mambaout_jax.{a.name}" if a.name in LAYERS else "mambaout_jax" for a in child.names]
                else:
                    names = [child.module]
                found.extend((n, child.lineno, in_function) for n in names)
            visit(child, nested)

    visit(tree, False)
    return found


def library_modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_imports_only_its_own_layer_or_below():
    upward = []
    for path in library_modules():
        source = module_name(path)
        for target, line, _ in project_imports(ast.parse(path.read_text(), str(path))):
            if layer_of(target) > layer_of(source):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target}")
    assert not upward, "imports that look up a layer:\n" + "\n".join(upward)


def test_no_project_import_hides_inside_a_function():
    """A function-local import of the project's own modules is how a cycle gets dodged; there are none."""
    hidden = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in library_modules()
        for target, line, in_function in project_imports(ast.parse(path.read_text(), str(path)))
        if in_function
    ]
    assert not hidden, "\n".join(hidden)


def test_the_checker_sees_an_upward_import():
    """The walk itself: an upward import, at module level or inside a function, is found."""
    tree = ast.parse("from mambaout_jax.train import steps\ndef f():\n    from mambaout_jax import create_model\n")
    imports = project_imports(tree)
    assert imports == [("mambaout_jax.train", 1, False), ("mambaout_jax", 3, True)]
    assert layer_of("mambaout_jax.train") > layer_of("mambaout_jax.models.layers")
    assert layer_of("mambaout_jax") == FRONT


def test_the_models_layer_does_no_file_io():
    """Pure modules: nothing under models/ opens, reads or writes a file."""
    forbidden = {"open", "torch", "safetensors", "orbax", "pathlib", "os"}
    offenders = []
    for path in (PACKAGE / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                names = ["open"]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n in forbidden]
    assert not offenders, offenders
