"""The package map, checked on the source: every import of our code goes through the `multitune` package, lower
layers (recipes → data_prep → trainer → launch) never import upper ones, and pyproject.toml installs every folder."""

from __future__ import annotations

import ast

import pytest
import tomllib
from conftest import REPO

pytestmark = pytest.mark.unit

LAYERS = ["recipes", "data_prep", "trainer", "launch"]


def imported_modules(path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, also those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def python_files(*folders: str):
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_our_code_is_imported_only_through_the_multitune_package():
    bare = [f"{p.relative_to(REPO)}:{line}: import {name}"
            for p in python_files(*LAYERS, "bench", "tests") for line, name in imported_modules(p)
            if name.split(".")[0] in LAYERS]
    assert not bare, "\n".join(bare)


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_a_lower_layer_never_imports_an_upper_one(layer):
    upper = {f"multitune.{name}" for name in LAYERS[LAYERS.index(layer) + 1:]}
    wrong = [f"{p.relative_to(REPO)}:{line}: import {name}" for p in python_files(layer)
             for line, name in imported_modules(p) if ".".join(name.split(".")[:2]) in upper]
    assert not wrong, "\n".join(wrong)


def test_pyproject_installs_every_package_folder():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"multitune"} | {"multitune." + ".".join(init.parent.relative_to(REPO).parts)
                               for layer in LAYERS for init in (REPO / layer).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders
    assert {k: v for k, v in setuptools["package-dir"].items()} == {f"multitune.{name}": name for name in LAYERS}


def test_the_package_root_modules_import_no_layer():
    """multitune/compat.py (and its siblings) sit under every layer: any layer may import them, they import none."""
    wrong = [f"{p.relative_to(REPO)}:{line}: import {name}" for p in (REPO / "multitune").glob("*.py")
             if p.name != "__main__.py" for line, name in imported_modules(p)
             if ".".join(name.split(".")[:2]) in {f"multitune.{layer}" for layer in LAYERS}]
    assert not wrong, "\n".join(wrong)


def test_training_runs_through_one_entry():
    """`multitune train` (single process and launched ranks), the SLURM task and sweep trials all train through
    launch/run.py's `run_training`: it alone calls the loop, so signals, lost peers and teardown are handled once."""
    callers = sorted(str(p.relative_to(REPO)) for p in python_files(*LAYERS)
                     for node in ast.walk(ast.parse(p.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module == "multitune.trainer.loop"
                     and any(alias.name == "train" for alias in node.names))
    assert callers == ["launch/run.py"]
