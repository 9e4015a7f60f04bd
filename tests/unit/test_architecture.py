"""Layers point one way: core (errors, registry, config, checkpoint, runner, the model / task adapters, the data
and the fidelity metric) knows no library and no stage; libraries (pruning, quant, measurement, training, export
and the backends) know no stage; stages know everything below them. Every import counts, module-level and
function-local alike (ast walk of the sources)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE_MODULES = {"compress", "compress.errors", "compress.registry", "compress.config", "compress.checkpoint",
                "compress.threads", "compress.ppocr_compat", "compress.models", "compress.tasks", "compress.runner",
                "compress.fidelity", "compress.backoff", "compress.stages.base"}
STAGE_MODULES = {"finetune.stage", "export.stage"}
PACKAGES = ("compress", "finetune", "export")
LAYERS = ("core", "library", "stage")


def layer(module):
    """``core``, ``library`` or ``stage`` for a project module; None for third-party modules."""
    if module.split(".")[0] not in PACKAGES:
        return None
    if module in CORE_MODULES or module.startswith("compress.data"):
        return "core"
    if module in STAGE_MODULES or module.startswith("compress.stages"):
        return "stage"
    return "library"


def project_modules(root):
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    yield module[:-len(".__init__")] if module.endswith(".__init__") else module, path


def imported_modules(path):
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def upward_imports(root=ROOT):
    found = []
    for module, path in project_modules(root):
        own = LAYERS.index(layer(module))
        for target in imported_modules(path):
            target_layer = layer(target)
            if target_layer is not None and LAYERS.index(target_layer) > own:
                found.append(f"{module} ({layer(module)}) imports {target} ({target_layer})")
    return found


def test_no_import_goes_up_a_layer():
    assert upward_imports() == []


def test_the_walk_sees_function_local_imports(tmp_path):
    """A library module importing a stage inside a function is caught (the check is not only module-level)."""
    package = tmp_path / "export"
    package.mkdir()
    (package / "sneaky.py").write_text("def f():\n    from compress.stages.quant import QuantConfig\n")
    (tmp_path / "compress").mkdir()
    (tmp_path / "compress" / "runner.py").write_text("import export.stage\n")
    assert upward_imports(str(tmp_path)) == ["compress.runner (core) imports export.stage (stage)",
                                             "export.sneaky (library) imports compress.stages.quant (stage)"]


@pytest.mark.parametrize("module, expected", [("compress.runner", "core"), ("compress.pruning.plan", "library"),
                                              ("export.backends.openvino_runtime", "library"),
                                              ("export.stage", "stage"), ("compress.stages.quant", "stage"),
                                              ("numpy", None)])
def test_layers_of_known_modules(module, expected):
    assert layer(module) == expected
