"""The house rules a reader relies on: each room holds its own kind of code, nothing imports from
tests, runtime packages never reach into the tooling, and functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("flash", "pipeline", "actors")
TOOLING = ("bench", "demo")
MAX_FUNCTION_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def test_nothing_outside_tests_imports_from_tests():
    offenders = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _sources(*RUNTIME, "jobs", *TOOLING)
        for m in _imported_modules(p)
        if _top(m) == "tests"
    ]
    assert offenders == []


def test_runtime_packages_do_not_import_jobs_benchmarks_or_the_demo():
    offenders = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _sources(*RUNTIME)
        for m in _imported_modules(p)
        if _top(m) in ("jobs", *TOOLING, "tests")
    ]
    assert offenders == []


def test_flash_imports_no_cluster_or_storage_library():
    offenders = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _sources("flash")
        for m in _imported_modules(p)
        if _top(m) in ("ray", "boto3", "botocore", "pyarrow", "pipeline", "actors")
    ]
    assert offenders == []


def test_jobs_holds_only_what_users_run():
    scripts = {p.name for p in (ROOT / "jobs").glob("*.py")} - {"__init__.py"}
    assert scripts == {"caption_videos.py", "train_drafter.py"}


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _sources(*RUNTIME, "jobs", *TOOLING):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
