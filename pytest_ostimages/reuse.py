"""Keep a session's VMs for the next run (``--ost-reuse``).

At the end of a session the environment is kept running and described in
``<workdir root>/kept.json``: its :class:`Environment` record and a fingerprint of
everything that shaped it (the VMs asked for, the images they came from, the
templates and the settings). The next session with the same fingerprint attaches
and becomes the run's owner, so the reaper takes the VMs if that session dies; a
different fingerprint removes the kept environment and boots afresh. The reaper
spares the run that kept.json names; ``--ost-cleanup`` removes it.

kept.json is read and written under a host-wide lock, and written atomically:
two sessions never attach to the same VMs, and a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import reaper
from .environment import Environment
from .files import host_lock, write_atomic
from .reaper import Owned

if TYPE_CHECKING:
    from .inputs import VMSpec
    from .lab import Lab

KEPT_FILE = "kept.json"  # in the work directory root


def fingerprint(lab: "Lab", specs: list["VMSpec"]) -> str:
    """What shaped the VMs of `specs`: a kept environment is reused only if it is unchanged.

    An OST suite's deploy scripts are in it by content: the kept VMs already ran them,
    so a session that attaches does not run them again, and a changed script boots afresh.
    """
    config = lab.config
    parts: list[Any] = [config.libvirt_uri, config.virt_type, config.cpu_mode, config.dns_domain,
                        config.identity, config.ip_version, lab.ost and lab.ost.suite,
                        [(n.role, n.management) for n in lab.topology]]
    for spec in sorted(specs, key=lambda s: s.role):
        parts.append([spec.role, lab.inputs.image(spec.image).identity(), *lab.inputs.size(spec),
                      spec.nics, spec.disks, spec.shares, spec.user_data,
                      [hashlib.sha256(script.read_bytes()).hexdigest() for script in spec.deploy_scripts]])
    for name in ("domain.xml", "network.xml"):
        parts.append(lab.inputs.templates.text(name))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _lock_name(workdir_root: Path) -> str:
    return "reuse-" + hashlib.sha256(str(workdir_root).encode()).hexdigest()[:12]


def _read(workdir_root: Path) -> Optional[tuple[str, Environment]]:
    """(fingerprint, environment) kept under `workdir_root`, None if none (or unreadable)."""
    try:
        data = json.loads((workdir_root / KEPT_FILE).read_text())
        return str(data["fingerprint"]), Environment.from_json(data["environment"], workdir_root)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Not ours to trust: forget it; its VMs are no longer spared by the reaper.
        (workdir_root / KEPT_FILE).unlink(missing_ok=True)
        return None


def kept_runs(workdir_root: Path) -> set[str]:
    """The run kept for --ost-reuse (the reaper spares it)."""
    kept = _read(workdir_root)
    return {kept[1].run_id} if kept else set()


def attach_kept(lab: "Lab", specs: list["VMSpec"]) -> bool:
    """Attach to the kept environment if it matches `specs` and still runs; else drop it."""
    root = lab.config.workdir
    if not (root / KEPT_FILE).exists():
        return False
    with host_lock(_lock_name(root)):
        kept = _read(root)
        if kept is None:
            return False
        (root / KEPT_FILE).unlink()  # from now on nobody else attaches to it
        kept_fingerprint, env = kept
        if kept_fingerprint == fingerprint(lab, specs) and _alive(lab, env):
            lab.attach(env, adopt=True)
            lab.progress(f"reusing the VMs kept by an earlier run ({env.run_id})")
            return True
    lab.progress("the kept VMs do not match this session (images, templates or settings "
                 "changed): removing them")
    _remove(lab, env)
    return False


def keep(lab: "Lab", specs: list["VMSpec"]) -> None:
    """Leave the lab's VMs running for the next session."""
    root = lab.config.workdir
    state = json.dumps({"fingerprint": fingerprint(lab, specs), "environment": lab.environment().to_json()})
    with host_lock(_lock_name(root)):
        previous = _read(root)
        write_atomic(root / KEPT_FILE, state)
    lab.progress(f"keeping {len(lab.vms)} VMs for the next run with --ost-reuse "
                 f"(pytest --ost-cleanup removes them)")
    lab.release()
    if previous is not None and previous[1].run_id != lab.run_id:
        _remove(lab, previous[1])  # kept by a session that ran meanwhile: one kept environment


def drop(lab: "Lab") -> None:
    """Remove the kept environment, if any (libvirt is only contacted if there is one)."""
    root = lab.config.workdir
    if not (root / KEPT_FILE).exists():
        return
    with host_lock(_lock_name(root)):
        kept = _read(root)
        (root / KEPT_FILE).unlink(missing_ok=True)
    if kept is not None:
        _remove(lab, kept[1])


def forget(workdir_root: Path) -> None:
    """Stop sparing the kept environment (``--ost-cleanup``): the reaper may take it."""
    with host_lock(_lock_name(workdir_root)):
        (workdir_root / KEPT_FILE).unlink(missing_ok=True)


def _remove(lab: "Lab", env: Environment) -> None:
    """Remove what `env` names, each only if it still carries the kept run's label."""
    root = lab.config.workdir
    for vm in env.vms:
        reaper.remove(lab.conn, root, Owned("domain", vm.name, env.owner))
    for network in env.networks:
        reaper.remove(lab.conn, root, Owned("network", network.name, env.owner))
    reaper.remove(lab.conn, root, Owned("workdir", str(env.workdir), env.owner))


def _alive(lab: "Lab", env: Environment) -> bool:
    """Whether every VM and network of `env` still runs."""
    running = {d.name() for d in lab.conn.listAllDomains() if d.isActive()}
    running |= {n.name() for n in lab.conn.listAllNetworks() if n.isActive()}
    return all(vm.name in running for vm in env.vms) and all(n.name in running for n in env.networks)
