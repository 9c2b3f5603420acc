"""Which VMs a session boots: those of the VM fixtures its selected tests resolve to.

Each VM fixture made by the factories in fixtures.py carries the VMs it needs. The
plan is made per session, after deselection (-k, -m, --deselect), from the fixture
definition each test actually gets, as pytest resolves it: two conftests may both
define ``engine`` (each for its own directory) and each test plans the one it will
use. The definitions are found where pytest finds them (the test's class and
module, the conftests above it, the plugins), through public APIs only. Two
definitions that give one role different VMs in one session are an error, not a
silent choice.
"""

from __future__ import annotations

from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import pytest

from ..config import OstConfig
from ..errors import SessionError
from .inputs import VMSpec

SpecsOf = Callable[[OstConfig], list[VMSpec]]
_SPECS = "ost_vm_specs"
CHECKPOINT = "ost_checkpoint"  # a checkpoint fixture's description (checkpoints.Checkpoint)


def vm_fixture_specs(fixture: Any, specs: SpecsOf) -> Any:
    """Mark `fixture` (made by pytest.fixture) as booting `specs(config)`."""
    setattr(fixture, _SPECS, specs)
    return fixture


def _example() -> None: ...


_FIXTURE = type(pytest.fixture(_example))  # what pytest.fixture returns: a function before pytest 8.4


def fixture_name(value: Any, attribute: str) -> Optional[str]:
    """The name of fixture `value`, found as `attribute` of a module or class; None if not a fixture."""
    if isinstance(value, FunctionType):
        # pytest 8.0-8.3 (the declared floor) returns the function itself, with this mark; no
        # public API reads it. A name given to pytest.fixture wins over the attribute's, as there.
        mark = getattr(value, "_pytestfixturefunction", None)
        return None if mark is None else mark.name or attribute
    return value.name if isinstance(value, _FIXTURE) else None  # pytest 8.4 and later


def _fixtures(namespace: Any) -> dict[str, Any]:
    """The fixtures defined in a module or class: name -> the fixture (its VMs, if a VM fixture, are
    its `_SPECS`; a checkpoint's description its CHECKPOINT attribute)."""
    found = ((fixture_name(value, attribute), value) for attribute, value in vars(namespace).items())
    return {name: value for name, value in found if name is not None}


def _definitions(item: pytest.Item) -> Iterator[tuple[str, dict[str, Any]]]:
    """Where pytest looks for the item's fixtures, nearest first: its class, its module, the
    conftests of its directories (deepest first), then the plugins (latest registered first)."""
    for attribute in ("cls", "module"):
        namespace = getattr(item, attribute, None)
        if namespace is not None:
            yield f"{item.nodeid.split('::')[0]}", _fixtures(namespace)
    conftests, plugins = [], []
    for _name, plugin in reversed(item.config.pluginmanager.list_name_plugin()):
        path = getattr(plugin, "__file__", None) if isinstance(plugin, ModuleType) else None
        if path is None or plugin is getattr(item, "module", None):
            continue
        if Path(path).name == "conftest.py":
            folder = Path(path).parent
            if folder == item.path.parent or folder in item.path.parents:
                conftests.append((len(folder.parts), str(folder), plugin))
        else:
            plugins.append(plugin)
    for _depth, folder, conftest in sorted(conftests, key=lambda c: -c[0]):
        yield f"{folder}/conftest.py", _fixtures(conftest)
    for plugin in plugins:
        yield "plugin default" if plugin.__name__ == "pytest_ostimages.fixtures" else plugin.__name__, \
            _fixtures(plugin)


def _in_setup_order(names: list[str], checkpoints: dict[str, Any]) -> list[Any]:
    """The checkpoints among a test's fixtures `names`, in the order pytest sets them up: each one
    after the checkpoints it asks for (its `arguments`), the others in the test's order."""
    order: list[Any] = []

    def visit(name: str) -> None:
        if name in checkpoints and checkpoints[name] not in order:
            for argument in checkpoints[name].arguments:
                visit(argument)
            if checkpoints[name] not in order:
                order.append(checkpoints[name])

    for name in names:
        visit(name)
    return order


class Plan:
    """For each selected test: the VM fixtures it uses (where each was defined), and the
    checkpoint fixtures (checkpoints.py) of the first test that uses VMs, which the session sets
    up before that test runs."""

    def __init__(self, needs: Optional[dict[str, list[tuple[str, SpecsOf]]]] = None,
                 checkpoints: Sequence[Any] = ()) -> None:
        self._needs = needs or {}
        self.checkpoints = list(checkpoints)

    @classmethod
    def of(cls, items: Iterable[pytest.Item]) -> "Plan":
        needs: dict[str, list[tuple[str, SpecsOf]]] = {}
        first_checkpoints: Optional[list[Any]] = None
        for item in items:
            names = list(getattr(item, "fixturenames", ()))  # pytest's own closure of the test's fixtures
            chosen: dict[str, tuple[str, Any]] = {}
            for where, fixtures in _definitions(item):
                for name in names:
                    if name in fixtures and name not in chosen:  # a nearer definition hides the others
                        chosen[name] = (f"{name} ({where})", fixtures[name])
            planned = [(where, getattr(fixture, _SPECS)) for where, fixture in (chosen[n] for n in names if n in chosen)
                       if getattr(fixture, _SPECS, None)]
            if planned:
                needs[item.nodeid] = planned
                if first_checkpoints is None:
                    found = {name: getattr(fixture, CHECKPOINT) for name, (_, fixture) in chosen.items()
                             if getattr(fixture, CHECKPOINT, None) is not None}
                    first_checkpoints = _in_setup_order(names, found)
        return cls(needs, first_checkpoints or [])

    def specs(self, config: OstConfig, items: Optional[Iterable[pytest.Item]] = None) -> list[VMSpec]:
        """The VMs of all selected tests (or of `items`), one per role, in plan order."""
        ids = [item.nodeid for item in items] if items is not None else list(self._needs)
        chosen: dict[str, tuple[str, VMSpec]] = {}
        for nodeid in ids:
            for where, specs in self._needs.get(nodeid, []):
                for spec in specs(config):
                    earlier = chosen.setdefault(spec.role, (where, spec))
                    if earlier[1] != spec:
                        raise SessionError(
                            f"Two VM fixtures give the role {spec.role!r} different VMs in one "
                            f"session: {earlier[0]} boots {earlier[1]} and {where} boots {spec}. "
                            f"A session has one VM per role: give one of them another role.")
        return [spec for _, spec in chosen.values()]
