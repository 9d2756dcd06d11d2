"""The shape of the code itself (issue 24's limits), checked on the source: rooms of one concern
stay small, no import cycle (function-level imports included), and a teacher loads without the
train step."""

import ast
import os
import subprocess
import sys

import grimp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "at_jax")
MAX_MODULE, MAX_CLASS, MAX_FUNCTION, MAX_POSITIONAL = 400, 150, 80, 6


def sources():
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    yield os.path.relpath(path, REPO), f.read()


def is_literal(node: ast.AST) -> bool:
    """A function that only builds and returns a config literal (the recipes) is data."""
    body = [n for n in node.body if not isinstance(n, ast.Expr)]  # docstring aside
    return all(isinstance(n, (ast.Assign, ast.AnnAssign, ast.Return)) for n in body)


def test_modules_classes_functions_and_constructors_stay_small():
    problems = []
    for path, text in sources():
        lines = text.count("\n")
        if lines > MAX_MODULE:
            problems.append(f"{path}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            where = f"{path}:{node.lineno}"
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                problems.append(f"{where} class {node.name}: {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if size > MAX_FUNCTION and not is_literal(node):
                    problems.append(f"{where} {node.name}: {size} lines")
                positional = len(node.args.posonlyargs) + len(node.args.args) - 1  # self
                if node.name == "__init__" and positional > MAX_POSITIONAL:
                    problems.append(f"{where} __init__: {positional} positional parameters")
    assert not problems, "\n".join(problems)


def find_cycle(graph: grimp.ImportGraph) -> list[str]:
    """One import cycle among at_jax's modules, or []."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith("at_jax"):
                continue
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state:
                found = visit(imported)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph.modules):
        if module.startswith("at_jax") and module not in state:
            found = visit(module)
            if found:
                return found
    return []


def test_no_import_cycle_function_level_imports_included():
    graph = grimp.build_graph("at_jax")  # grimp reads imports inside functions too
    # a package's __init__ that imports its own submodules is no cycle of concerns: drop the
    # edges from a submodule up to the package that contains it
    for module in list(graph.modules):
        for imported in list(graph.find_modules_directly_imported_by(module)):
            if module.startswith(imported + "."):
                graph.remove_import(importer=module, imported=imported)
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_loading_a_teacher_imports_no_train_step_and_no_optax():
    for module in ("at_jax.runs", "at_jax.teacher"):
        code = (
            f"import sys; from {module} import load_teacher; "
            "bad = [m for m in ('optax', 'at_jax.step', 'at_jax.objective', 'at_jax.losses') "
            "if m in sys.modules]; print(bad); assert not bad"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_the_cli_and_its_tensorboard_writer_do_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch when it is installed (seconds in every run and Grain worker);
    at_jax writes its event files without it, and torch stays importable afterwards."""
    pytest.importorskip("torch")  # installed by `make test`
    code = (
        "import sys, at_jax.main; from at_jax.metrics import MetricsWriter; "
        f"w = MetricsWriter({str(tmp_path)!r}, 0); w.tb.add_scalar('x', 1.0, 1); w.tb.close(); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "import torch; print(torch.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "torch", out.stdout + out.stderr
    assert any(n.startswith("events.out") for n in os.listdir(tmp_path / "tensorboard"))
