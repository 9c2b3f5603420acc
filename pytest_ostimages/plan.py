"""Which VMs a session boots: those of the VM fixtures its selected tests resolve to.

Each VM fixture made by the factories in plugin.py carries the VMs it needs.
The plan is made per session, after deselection (-k, -m, --deselect), from the
fixture definitions each test actually gets, as pytest resolves them: two
conftests may both define ``engine`` (each for its own directory) and each test
plans the one it will use. Two definitions that give one role different VMs in
one session are an error, not a silent choice.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import pytest

from .config import OstConfig
from .errors import OstError
from .inputs import VMSpec

SpecsOf = Callable[[OstConfig], list[VMSpec]]
_ATTRIBUTE = "ost_vm_specs"


def vm_fixture_specs(function: Any, specs: SpecsOf) -> Any:
    """Mark `function` (before it becomes a fixture) as booting `specs(config)`."""
    setattr(function, _ATTRIBUTE, specs)
    return function


def specs_of(function: Any) -> Optional[SpecsOf]:
    return getattr(function, _ATTRIBUTE, None)


class Plan:
    """For each selected test: the VM fixtures it uses (where each was defined)."""

    def __init__(self, needs: Optional[dict[str, list[tuple[str, SpecsOf]]]] = None) -> None:
        self._needs = needs or {}

    @classmethod
    def of(cls, items: Iterable[pytest.Item]) -> "Plan":
        needs: dict[str, list[tuple[str, SpecsOf]]] = {}
        for item in items:
            # pytest's own resolution for this test: the last definition is the one it gets
            # (no public API gives it before the test runs).
            info = getattr(item, "_fixtureinfo", None)
            for name, definitions in (getattr(info, "name2fixturedefs", None) or {}).items():
                specs = specs_of(definitions[-1].func) if definitions else None
                if specs is not None:
                    where = f"{name} ({definitions[-1].baseid or 'plugin default'})"
                    needs.setdefault(item.nodeid, []).append((where, specs))
        return cls(needs)

    def specs(self, config: OstConfig, items: Optional[Iterable[pytest.Item]] = None) -> list[VMSpec]:
        """The VMs of all selected tests (or of `items`), one per role, in plan order."""
        ids = [item.nodeid for item in items] if items is not None else list(self._needs)
        chosen: dict[str, tuple[str, VMSpec]] = {}
        for nodeid in ids:
            for where, specs in self._needs.get(nodeid, []):
                for spec in specs(config):
                    earlier = chosen.setdefault(spec.role, (where, spec))
                    if earlier[1] != spec:
                        raise OstError(
                            f"Two VM fixtures give the role {spec.role!r} different VMs in one "
                            f"session: {earlier[0]} boots {earlier[1]} and {where} boots {spec}. "
                            f"A session has one VM per role: give one of them another role.")
        return [spec for _, spec in chosen.values()]
