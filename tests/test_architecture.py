"""The layout holds: the layer contract (import-linter, pyproject.toml), no import cycle
between files, every inserted op handled by every consumer, short functions."""
from __future__ import annotations

import ast
import graphlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memsched"


def test_layer_contract_holds():
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    assert code == 0, "a lower layer imports a higher one: see the import-linter report above"


def _imports() -> dict[str, set[str]]:
    """module -> the memsched modules it imports (function-level imports included)."""
    import grimp

    graph = grimp.build_graph("memsched", cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def test_no_import_cycle_between_files():
    deps = _imports()
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle between files: {' -> '.join(e.args[1])}")


def test_no_import_cycle_between_folders():
    def folder(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2])

    deps: dict[str, set[str]] = {}
    for m, targets in _imports().items():
        deps.setdefault(folder(m), set()).update(folder(t) for t in targets if folder(t) != folder(m))
    deps.pop("memsched", None)  # the package root re-exports the public API from everywhere
    for targets in deps.values():
        targets.discard("memsched")
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle between folders: {' -> '.join(e.args[1])}")


def test_every_inserted_op_has_a_handler_in_every_consumer():
    import memsched  # noqa: F401  (imports every consumer, which registers its table)
    import memsched.io.serialize  # noqa: F401
    import memsched.runtime.codegen  # noqa: F401
    from memsched.ir import ops

    assert {"printer", "verifier", "simulator", "memory", "serializer", "executor"} <= set(ops.CONSUMERS)
    assert ops.missing_handlers() == {}


def test_a_missing_handler_is_reported():
    from memsched.ir import ops

    ops.register("incomplete", {ops.Op.PREFETCH: None})
    try:
        assert ops.missing_handlers()["incomplete"] == [op for op in ops.Op if op is not ops.Op.PREFETCH]
    finally:
        del ops.CONSUMERS["incomplete"]


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_no_function_is_longer_than_80_lines():
    long = [f"{path}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for path, f in _functions() if f.end_lineno - f.lineno + 1 > 80]
    assert not long, "split these functions: " + "; ".join(long)


def test_ir_imports_nothing_else_of_memsched():
    deps = _imports()
    outside = {m: sorted(t for t in ts if not t.startswith("memsched.ir"))
               for m, ts in deps.items() if m.startswith("memsched.ir")}
    assert not any(outside.values()), outside
