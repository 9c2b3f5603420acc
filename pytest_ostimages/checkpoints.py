"""Checkpoint fixtures: a session fixture whose end state is saved, and skipped when saved already.

    from pytest_ostimages import checkpoint

    @checkpoint(files=["service.conf"])
    def service_configured(engine, hosts):
        ...                      # minutes of setup across the VMs
        return {"port": 8080}    # a VM, a list or dict of VMs, or JSON-serialisable data

The first session runs the fixture and, right after it returns, saves every VM of the
session together (memory and every disk: Lab.save_environment). A later session whose
key matches restores the VMs in that state instead, each on its own networks with its
own addresses, and skips the body; the fixture's value is rebuilt. The key is the
environment the fixture started from (the VMs as booted or as an OST suite deployed
them, or the checkpoint before it: checkpoints build on each other) plus the
fixture's source, its parameter and the content of the files it declares. A changed
input makes a new state; ``--ost-warm=off`` runs everything.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pytest

from .errors import OstError, WarmStartError
from .guest.vm import VM
from .lab.lab import Lab
from .lab.chain import Checkpoint, checkpoint_key
from .lab.plan import CHECKPOINT, fixture_name
from .state.warmcache import recipe_key
from .session import user_errors

VM_KEY = "$vm"  # how a VM stands in a saved value: {"$vm": role}


def checkpoint(function: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
               files: Sequence[Union[str, Path]] = (), params: Optional[Sequence[Any]] = None,
               scope: str = "session") -> Any:
    """Make `function` a session fixture whose end state is saved (see the module's docstring).

    `files`: paths (relative to the defining module's directory) whose content is an input.
    `params`: as pytest.fixture's; each value is an input of its own state.
    """

    def make(func: Callable[..., Any]) -> Any:
        where = f"checkpoint fixture {getattr(func, '__name__', func)!r}"
        if not inspect.isfunction(func) or fixture_name(func, func.__name__) is not None:
            raise TypeError(f"{where}: apply @checkpoint to a plain function, not to a pytest fixture "
                            f"(it makes the fixture itself)")
        if scope != "session":
            raise TypeError(f"{where}: is {scope}-scoped, but a checkpoint saves the whole session's VMs; "
                            f"it must be session-scoped")
        if inspect.isgeneratorfunction(func):
            raise TypeError(f"{where}: yields; a checkpoint must return its value (after a restore its "
                            f"body, and so a teardown after its yield, does not run)")
        folder = Path(inspect.getfile(func)).parent
        declared = {str(f): folder / f for f in files}  # as given (the key's), and where
        arguments = [p for p in inspect.signature(func).parameters if p not in ("request", "ost_lab")]

        def fixture(request: pytest.FixtureRequest, ost_lab: Lab, **kwargs: Any) -> Any:
            with user_errors(request.config, request.session):
                return _run(request, ost_lab, func, declared, kwargs)

        fixture.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ("request", "ost_lab", *arguments)])
        fixture.__doc__ = func.__doc__
        fixture.__name__ = func.__name__
        described = Checkpoint(name or func.__name__, func, declared, params, tuple(arguments))
        # for the plugin's hooks (is_checkpoint) and the plan (lab/chain.py), on what pytest holds
        setattr(fixture, CHECKPOINT, described)
        defined = pytest.fixture(scope="session", name=name or func.__name__, params=params)(fixture)
        setattr(defined, CHECKPOINT, described)
        return defined

    return make(function) if function is not None else make


def _run(request: pytest.FixtureRequest, lab: Lab, func: Callable[..., Any], files: dict[str, Path],
         kwargs: dict[str, Any]) -> Any:
    name = request.fixturename
    own = inspect.signature(func).parameters
    wanted = {**kwargs, **{k: v for k, v in (("request", request), ("ost_lab", lab)) if k in own}}
    cache = lab.warm_cache
    if cache is None or not lab.vms:  # --ost-warm=off, or nothing to save
        return func(**wanted)
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise OstError(f"Checkpoint fixture {name!r} declares files that do not exist: {', '.join(missing)} "
                       f"(paths are relative to {inspect.getfile(func)}'s directory).")
    parent = lab.current_environment or lab.environment_key(list(lab.specs.values()))
    inputs = {"fixture": f"{inspect.getfile(func)}:{inspect.getsourcelines(func)[1]} {name}",
              "files": sorted(files), "param": _param(request)}
    key = checkpoint_key(parent, inspect.getsource(func), inputs["param"], files)
    state = cache.state(key)
    if key in lab.reached:  # the session's VMs were restored in this state, or a deeper one (chain.py)
        try:
            value = _rebuild(state.data()["value"], lab)
        except (OSError, KeyError, ValueError) as exc:
            raise OstError(f"Checkpoint fixture {name!r}: the session's VMs were restored in its saved state "
                           f"{key}, whose value cannot be read now ({exc}). Run the session again.") from None
        lab.reached = lab.reached[lab.reached.index(key) + 1:]
        lab.current_environment = key
        lab.progress(f"checkpoint {name}: saved state {key} found: its body does not run")
        return value
    if lab.reached:
        _back_to(lab, name, parent)
    if state.exists():
        try:
            value = _rebuild(state.data()["value"], lab)
            lab.restore_environment(state)  # when the VMs are next used: a deeper one may come first
        except (WarmStartError, KeyError, ValueError) as exc:
            lab.progress(f"checkpoint {name}: its saved state {key} cannot be used ({exc}): running it")
        else:
            lab.progress(f"checkpoint {name}: saved state {key} found: its body does not run")
            return value
    lab.settle()  # in the state this one starts from
    start = time.monotonic()
    value = func(**wanted)
    lab.progress(f"checkpoint {name}: ran in {time.monotonic() - start:.1f} s")
    try:
        saved = _encode(value)
    except TypeError as exc:
        lab.progress(f"checkpoint {name}: not saved: its value cannot be rebuilt from a saved state ({exc}); "
                     f"return a VM, a list or dict of VMs, or JSON-serialisable data")
        lab.current_environment = recipe_key([parent, "then ran", key])  # what comes next builds on its effects
        return value
    lab.save_environment(key, {"name": name, "inputs": inputs, "value": saved, "parent": parent})
    return value


def _back_to(lab: Lab, name: str, parent: str) -> None:
    """The session's VMs were restored ahead, in a checkpoint's state that this one (`name`) does not
    build on (the plan foresaw other checkpoints first): put them back in the state it starts from."""
    ahead, lab.reached = lab.reached[-1], []
    cache = lab.warm_cache
    state = cache.state(parent) if cache is not None else None
    if state is None or not state.exists():
        raise OstError(f"Checkpoint fixture {name!r} starts from the VMs as the session booted them, but the session "
                       f"restored them in saved state {ahead} (its first test's checkpoints), and that start is not "
                       f"saved. Let the first test ask for this checkpoint too, or run with --ost-warm=off.")
    lab.restore_environment(state)


def is_checkpoint(fixture_function: Any) -> bool:
    """Whether a fixture's function was made by @checkpoint (it does not need the VMs restored)."""
    return getattr(fixture_function, CHECKPOINT, None) is not None


def _param(request: pytest.FixtureRequest) -> Any:
    param = getattr(request, "param", None)
    try:
        json.dumps(param)
    except TypeError:
        return repr(param)
    return param


def _encode(value: Any) -> Any:
    """`value` as JSON, a VM as {"$vm": role}; TypeError for what cannot be rebuilt."""
    if isinstance(value, VM):
        return {VM_KEY: value.role}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or VM_KEY in value:
            raise TypeError(f"a dict with keys other than strings, or with the key {VM_KEY!r}")
        return {k: _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"a {type(value).__name__}")


def _rebuild(value: Any, lab: Lab) -> Any:
    if isinstance(value, dict) and set(value) == {VM_KEY}:
        if value[VM_KEY] not in lab.vms:
            raise ValueError(f"it names VM {value[VM_KEY]!r}, which this session does not have")
        return lab.vms[value[VM_KEY]]
    if isinstance(value, list):
        return [_rebuild(v, lab) for v in value]
    if isinstance(value, dict):
        return {k: _rebuild(v, lab) for k, v in value.items()}
    return value
