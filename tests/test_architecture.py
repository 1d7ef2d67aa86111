"""The layering of docs/architecture.md, checked on the source: every import of a safedecode module
(module level or inside a function) goes to the same stage or a stage below; no module imports a
private name (``_x``) of another safedecode module; no two modules share a name."""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "safedecode"

# Stage of each sub-package (docs/architecture.md); top-level modules are named one by one.
STAGES = {"errors": 0, "extras": 0, "resources": 0, "models": 0, "version": 0,
          "automata": 1, "policy": 2, "tokens": 3, "engine": 4, "adapters": 5, "channels": 6,
          "integrations": 7, "server": 8, "cli": 9, "demo": 9, "__main__": 9, "__init__": 9}


def modules() -> dict[str, Path]:
    """Dotted name (under safedecode) → file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def stage(module: str) -> int:
    head = module.split(".")[0]
    assert head in STAGES, f"safedecode.{module}: not placed in a stage (tests/test_architecture.py)"
    return STAGES[head]


def imports(module: str, path: Path):
    """``(line, target module, imported names)`` for every import of a safedecode module."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if module != "__init__" else []
    package = base if is_package else base[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(anchor + (node.module.split(".") if node.module else []))
            elif node.module and (node.module == "safedecode" or node.module.startswith("safedecode.")):
                target = node.module[len("safedecode."):] if node.module != "safedecode" else ""
            else:
                continue
            names = [alias.name for alias in node.names]
            for alias in node.names:  # `from . import kernels`: the module itself is the target
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in MODULES:
                    yield node.lineno, sub, []
                    names = [n for n in names if n != alias.name]
            if names:
                yield node.lineno, target or "__init__", names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("safedecode."):
                    yield node.lineno, alias.name[len("safedecode."):], []


def private_attributes(path: Path):
    """``(line, module alias, attribute)`` for every ``alias._name`` where ``alias`` is a safedecode
    module bound by ``from ... import module`` or ``import safedecode.x as alias``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("safedecode")):
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("safedecode.") and a.asname}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            yield node.lineno, node.value.id, node.attr


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_stages_and_use_public_names(module):
    own = stage(module)
    for line, target, names in imports(module, MODULES[module]):
        assert target in MODULES, f"safedecode.{module}:{line} imports safedecode.{target}, which does not exist"
        assert stage(target) <= own, (f"safedecode.{module}:{line} imports safedecode.{target}: stage "
                                      f"{stage(target)} is above this module's stage {own}")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"safedecode.{module}:{line} imports private names {private} of safedecode.{target}"
    for line, alias, attribute in private_attributes(MODULES[module]):
        raise AssertionError(f"safedecode.{module}:{line} uses the private {alias}.{attribute}")


def test_every_sub_package_is_a_stage_and_no_two_modules_share_a_name():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(STAGES), packages - set(STAGES)
    names = Counter(m.split(".")[-1] for m in MODULES if "." in m or m not in packages)
    names -= Counter({name: 1 for name in names})
    assert not names, f"module names used twice: {sorted(names)}"


def test_the_checker_sees_a_violation(tmp_path):
    """The walk is not vacuous: an upward import, a private import and a private attribute written
    into a module of the engine stage are all found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..server import app\nfrom .kernels import _find\nfrom . import kernels\n"
                   "def f():\n    return kernels._header\n")
    found = list(imports("engine.bad", bad))
    assert (1, "server.app", []) in found and (2, "engine.kernels", ["_find"]) in found
    assert any(stage(target) > stage("engine.bad") for _, target, _ in found)
    assert list(private_attributes(bad)) == [(5, "kernels", "_header")]
