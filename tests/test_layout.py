"""The package layout (docs/architecture.md): one folder per stage, one level deep, small modules."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "compressadvise"
ROOT_MODULES = {"__init__", "errors", "fsutil", "console"}
STAGES = {"knowledge", "model", "plan", "measure", "backends", "ui", "commands", "examples"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_BODY = 60


def modules() -> list[Path]:
    return [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]


def test_every_module_lives_in_a_stage_folder_one_level_deep():
    for p in modules():
        rel = p.relative_to(PKG)
        if len(rel.parts) == 1:
            assert p.stem in ROOT_MODULES, f"{rel}: a flat module; put it in its stage folder"
        else:
            assert len(rel.parts) == 2 and rel.parts[0] in STAGES, f"{rel}: folders are one level deep"
    for stage in STAGES:
        assert (PKG / stage / "__init__.py").is_file(), stage


def test_no_module_over_600_lines():
    big = {str(p.relative_to(PKG)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, big


def test_no_function_body_over_60_lines():
    """Measured from the first statement after the signature (a Typer command's option
    declarations are its signature, not its logic)."""
    long = {}
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > MAX_FUNCTION_BODY:
                    long[f"{p.relative_to(PKG)}:{node.name}"] = body
    assert not long, long


def test_modules_import_each_other_by_absolute_name():
    """`from compressadvise.plan.setting import Setting` says where a name lives; a relative
    import inside a stage folder would hide it."""
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and p.parent.name != "examples":
                raise AssertionError(f"{p.relative_to(PKG)}:{node.lineno}: relative import")
