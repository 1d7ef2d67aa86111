"""The layout of the tests and the benchmarks, checked on the source: a test module imports, of the
repository's own code, only the library and ``tests.support``; ``tests.support`` imports only itself
(and the library); a benchmark imports only the library, ``benchmarks/harness.py`` and
``tests.support`` — never a test module, another benchmark or the benchmarks package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = sorted((ROOT / "tests").glob("*.py"))
SUPPORT = sorted((ROOT / "tests" / "support").glob("*.py"))
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
BENCHMARK_NAMES = {p.stem for p in BENCHMARKS}


def imported(path: Path, package: str = "") -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in ``path`` (module level or inside a function),
    relative ones resolved against the file's package (``tests`` or ``tests.support``; by default
    from where the file is)."""
    package = package or ".".join(path.relative_to(ROOT).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [f"{module}.{alias.name}" for alias in node.names] if not node.module else [module]
                found += [(node.lineno, name) for name in names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def own(module: str) -> bool:
    """A module of this repository outside the library: tests..., benchmarks..., or a benchmark
    script imported by its bare name (its folder on sys.path)."""
    head = module.split(".")[0]
    return head in ("tests", "benchmarks") or head in BENCHMARK_NAMES


def in_support(module: str) -> bool:
    return module == "tests.support" or module.startswith("tests.support.")


def strays(path: Path, allowed) -> list[str]:
    """``file:line imports module`` for every import of the repository's own code that ``allowed``
    refuses."""
    return [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in imported(path)
            if own(module) and not allowed(module)]


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.name)
def test_a_test_imports_only_the_support_package(path):
    assert strays(path, in_support) == [], "shared code belongs in tests/support"


@pytest.mark.parametrize("path", SUPPORT, ids=lambda p: p.name)
def test_the_support_package_imports_only_itself(path):
    assert strays(path, in_support) == []


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_only_the_harness_and_the_support_package(path):
    assert strays(path, lambda module: module == "harness" or in_support(module)) == [], (
        "shared code belongs in benchmarks/harness.py or tests/support")


def test_the_checker_sees_a_violation(tmp_path):
    """Not vacuous: relative and absolute imports of a test module and of a benchmark are found."""
    bad = tmp_path / "probe.py"
    bad.write_text("from ..test_grammars import SECRETS_POSITIVE\nfrom .text_oracle import text_of\n"
                   "def f():\n    from benchmarks import redteam\n    import overhead\n")
    found = [module for _, module in imported(bad, package="tests.support")]
    assert found == ["tests.test_grammars", "tests.support.text_oracle", "benchmarks", "overhead"]
    assert [m for m in found if own(m) and not in_support(m)] == ["tests.test_grammars", "benchmarks", "overhead"]
