"""The saved states a session's checkpoint fixtures reach, known before any VM boots.

A checkpoint fixture's state is keyed on the state it starts from, its source, its
parameter and its files (checkpoints.py). The plan knows the checkpoint fixtures that
the session's first test sets up, in the order pytest sets them up (lab/plan.py), so
their keys can be followed before anything exists: from the environment the VMs are
booted (or an OST suite deployed) in, through each checkpoint whose state is saved, to
the deepest one. The session then restores that state instead of booting, and each of
those checkpoints, when it runs, finds itself reached already (Lab.reached).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .warm import damage

if TYPE_CHECKING:
    from ..guest.vm import VM
    from ..state.warmcache import SavedState
    from .inputs import VMSpec
    from .lab import Lab


def checkpoint_key(parent: str, source: str, param: Any, files: dict[str, Path]) -> str:
    """The key of a checkpoint's saved state: the state it started from, its source, its parameter
    and its files, by content, not by place (the same suite checked out elsewhere finds its states)."""
    return hashlib.sha256(json.dumps([parent, source, param, [[given, hashlib.sha256(path.read_bytes()).hexdigest()]
                                                              for given, path in sorted(files.items())]],
                                     default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint fixture as the plan sees it, before it runs."""

    name: str
    func: Callable[..., Any]
    files: dict[str, Path]  # as declared (the key's) -> where
    params: Optional[Sequence[Any]]
    arguments: tuple[str, ...]  # the fixtures it asks for

    def key(self, parent: str) -> Optional[str]:
        """Its state's key when it starts from state `parent`; None when that is known only once it
        runs (a parametrized one: pytest chooses the parameter; a declared file missing)."""
        if self.params is not None or not all(path.is_file() for path in self.files.values()):
            return None
        return checkpoint_key(parent, inspect.getsource(self.func), None, self.files)


def deepest_saved(lab: "Lab", parent: str, chain: Sequence[Checkpoint]) -> tuple[Optional["SavedState"], list[str]]:
    """The deepest saved state that `chain` (checkpoints in setup order) reaches from state `parent`,
    and the keys of the states on the way to it, that one last."""
    cache, found, keys = lab.warm_cache, None, []
    for checkpoint in chain:
        key = checkpoint.key(parent)
        state = cache.state(key) if cache is not None and key is not None else None
        if state is None or not state.exists() or any(damage(state.vm(role), lab.host)
                                                      for role in state.data().get("roles", [])):
            break  # (a damaged one runs again, on the one before it: checkpoints.py)
        found, parent = state, key
        keys.append(key)
    return found, keys


def boot_reached(lab: "Lab", specs: list["VMSpec"], chain: Sequence[Checkpoint],
                 parent: Optional[str] = None) -> Optional[list["VM"]]:
    """Boot `specs` (a lab's first VMs) as the deepest saved state `chain` reaches from `parent`
    (default: the environment of `specs` as booted): restored, nothing booted. None, with nothing
    made, when no state of the chain is saved for these VMs."""
    if lab.warm_cache is None or lab.vms or not specs:
        return None
    state, keys = deepest_saved(lab, parent or lab.environment_key(specs), chain)
    if state is None or sorted(state.data().get("roles", [])) != sorted(spec.role for spec in specs):
        return None
    vms = lab.boot(specs, environment=state)
    if all(vm.origin != "booted" for vm in vms):
        lab.reached = keys
        lab.progress(f"checkpoint {chain[len(keys) - 1].name}: the session's VMs start in its saved state "
                     f"{state.key}: nothing booted, and the checkpoints up to it do not run")
    return vms
