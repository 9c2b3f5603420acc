"""The package's structure: no import circle between its modules, and every import declared.

Read from the source with ``ast``: every import counts, also those under
``if TYPE_CHECKING:`` and inside functions, since a circle of type imports is still
a circle for the reader.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pytest_ostimages"
# import name -> the distribution setup.py must declare for it
DISTRIBUTIONS = {"libvirt": "libvirt-python", "libvirt_qemu": "libvirt-python", "paramiko": "paramiko",
                 "lxml": "lxml", "tenacity": "tenacity", "pytest": "pytest", "xdist": "pytest-xdist",
                 "cryptography": "cryptography", "psutil": "psutil", "pycdlib": "pycdlib",
                 "testinfra": "pytest-testinfra", "ansible_runner": "ansible-runner", "yaml": "pyyaml"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level names of other packages) that `path` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("pytest_ostimages") else theirs).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pytest_ostimages"):
                theirs.add(target)
                continue
            for alias in node.names:  # "from . import x" imports the module x
                candidate = f"{target}.{alias.name}"
                ours.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists()
                         or (ROOT / candidate.replace(".", "/")).is_dir() else target)
    return ours, {t.split(".")[0] for t in theirs}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports(path)[0] if m != name and m in MODULES} for name, path in MODULES.items()}


def test_no_import_circle_between_modules() -> None:
    # a package's __init__ re-exports; what it imports must not import it back
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert circles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_every_third_party_import_is_declared() -> None:
    setup = (ROOT / "setup.py").read_text()
    stdlib = set(sys.stdlib_module_names)
    undeclared = {}
    for name, path in MODULES.items():
        for top in imports(path)[1] - stdlib - {"", "pytest_ostimages"}:
            distribution = DISTRIBUTIONS.get(top)
            if distribution is None or f'"{distribution}' not in setup:
                undeclared.setdefault(top, []).append(name)
    assert undeclared == {}, f"imported but not declared in setup.py: {undeclared}"


PYTEST_PRIVATE = re.compile(r"(^|\s)(import|from) _pytest\b|\._(fixtureinfo|tmp_path_factory|fixturemanager|parser)\b"
                            r"|_ispytest=", re.M)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_pytest_api(name: str) -> None:
    assert PYTEST_PRIVATE.search(MODULES[name].read_text()) is None
