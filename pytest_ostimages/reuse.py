"""Keep a session's VMs for the next run (``--ost-reuse``).

At the end of a session the environment is kept running and described in
``<workdir root>/kept.json`` with a fingerprint of everything that shaped it:
the VMs asked for, the images they came from (file, size, mtime of every layer
in the chain), the templates and the settings. The next session with the same
fingerprint attaches instead of booting; a different fingerprint removes the
kept environment and boots afresh. The reaper leaves a kept environment alone
(its work directory carries a ``kept`` mark); ``--ost-cleanup`` removes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from . import virt
from .lab import Lab, VMSpec
from .owner import KEPT_FILE, KEPT_MARK


def fingerprint(lab: Lab, specs: list[VMSpec]) -> str:
    config = lab.config
    parts: list[Any] = [config.libvirt_uri, config.virt_type, config.cpu_mode, config.dns_domain]
    for spec in sorted(specs, key=lambda s: s.role):
        parts.append([spec.role, lab.image(spec.image).identity(), *lab.size(spec)])
    for name in ("domain.xml", "network.xml"):
        parts.append(lab.templates.text(name))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def attach_kept(lab: Lab, specs: list[VMSpec]) -> bool:
    """Attach to the kept environment if it matches `specs` and still runs; else drop it."""
    kept = _read(lab.config.workdir)
    if kept is None:
        return False
    if kept["fingerprint"] == fingerprint(lab, specs) and _alive(lab, kept["state"]):
        lab.attach(kept["state"])
        lab.progress(f"reusing the VMs kept by an earlier run ({kept['state']['run_id']})")
        # Nobody else may attach now; the kept mark stays, so that no reaper takes
        # objects that still carry the earlier run's (dead) owner.
        (lab.config.workdir / KEPT_FILE).unlink()
        return True
    lab.progress("the kept VMs do not match this session (images, templates or settings "
                 "changed): removing them")
    drop(lab)
    return False


def keep(lab: Lab, specs: list[VMSpec]) -> None:
    """Leave the lab's VMs running for the next session."""
    (lab.workdir.path / KEPT_MARK).touch()
    state = {"fingerprint": fingerprint(lab, specs), "state": lab.describe()}
    (lab.config.workdir / KEPT_FILE).write_text(json.dumps(state))
    lab.progress(f"keeping {len(lab.vms)} VMs for the next run with --ost-reuse "
                 f"(pytest --ost-cleanup removes them)")
    lab.release()


def drop(lab: Lab) -> None:
    """Remove the kept environment, if any (libvirt is only contacted if there is one)."""
    workdir_root = lab.config.workdir
    kept = _read(workdir_root)
    if kept is None:
        return
    state = kept["state"]
    for vm in state["vms"]:
        virt.remove_domain(lab.conn, vm["name"])
    virt.remove_network(lab.conn, state["network"]["name"])
    shutil.rmtree(workdir_root / state["run_id"], ignore_errors=True)
    (workdir_root / KEPT_FILE).unlink(missing_ok=True)


def _read(workdir_root: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((workdir_root / KEPT_FILE).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _alive(lab: Lab, state: dict[str, Any]) -> bool:
    names = {d.name() for d in lab.conn.listAllDomains() if d.isActive()}
    return all(vm["name"] in names for vm in state["vms"])
