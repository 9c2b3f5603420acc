"""Keep a session's VMs for the next run (``--ost-reuse``), and attach to them.

At the end of a session whose every VM became ready (an OST suite's: deployed too),
the environment is kept running: kept.json (state/kept.py) holds its record and a
fingerprint of everything that shaped it (the VMs asked for, the images they came
from, the templates and the settings), and the run's own record says "kept". The
next session with the same fingerprint checks that every VM still answers with its
pinned host key, becomes the run's owner (one atomic write of the run's record,
under the reuse lock, before kept.json is dropped: a reaper in between finds a
live owner) and attaches; a different fingerprint removes the kept environment and
boots afresh. ``--ost-cleanup`` forgets it, so that the reaper takes it.
"""

from __future__ import annotations

from .. import faults
from ..errors import OstError
from ..hypervisor.connection import libvirt_module
from ..state import kept
from ..state.environment import Environment
from ..state.ledger import Ledger, run_workdir
from ..state.owner import RunRecord
from .inputs import VMSpec
from .lab import Lab


def fingerprint(lab: Lab, specs: list[VMSpec]) -> str:
    """What shaped the VMs of `specs` (Lab.fingerprint): the kept environment is reused only if unchanged."""
    return lab.fingerprint(specs)


def attach_kept(lab: Lab, specs: list[VMSpec]) -> bool:
    """Attach to the kept environment if it matches `specs` and still runs; else drop it."""
    root = lab.workdir_root
    if not (root / kept.KEPT_FILE).exists():
        return False
    with kept.locked(root, lab.host):
        record = kept.read(root)
        if record is None:
            return False
        kept_fingerprint, env = record
        run = run_workdir(env.workdir, env.run_id, lab.host)
        if run is None or not run.kept:  # an adoption that crashed half-way: the reaper's now
            kept.forget(root)
            return False
        stopped = _not_running(lab, env)
        why = ("images, templates or settings changed" if kept_fingerprint != fingerprint(lab, specs)
               else f"{stopped} is not running any more" if stopped else "")
        if not why:
            try:
                lab.attach(env, adopt=True, verify=True)  # the run's record names this session first
            except OstError as exc:
                why = str(exc)
            else:
                faults.point("adopt")
                kept.forget(root)  # from now on nobody else attaches to it
                lab.progress(f"reusing the VMs kept by an earlier run ({env.run_id})")
                return True
        kept.forget(root)
    lab.progress(f"the kept VMs cannot be reused ({why}): removing them")
    _remove(lab, env)
    return False


def keep(lab: Lab, specs: list[VMSpec]) -> None:
    """Leave the lab's VMs running for the next session, if every one of them became ready."""
    not_ready = sorted(role for role, vm in lab.vms.items() if not vm.ready)
    if not_ready:
        lab.progress(f"not keeping the VMs for --ost-reuse: {', '.join(not_ready)} never became ready")
        lab.close()
        return
    root = lab.workdir_root
    env = lab.environment()
    with kept.locked(root, lab.host):
        previous = kept.read(root)
        kept.write(root, fingerprint(lab, specs), env)
        faults.point("keep")
        RunRecord(lab.owner, kept=True).write(lab.workdir.path)  # spared by the reaper from now on
    lab.progress(f"keeping {len(lab.vms)} VMs for the next run with --ost-reuse "
                 f"(pytest --ost-cleanup removes them)")
    lab.release()
    if previous is not None and previous[1].run_id != lab.run_id:
        _remove(lab, previous[1])  # kept by a session that ran meanwhile: one kept environment


def drop(lab: Lab) -> None:
    """Remove the kept environment, if any (libvirt is only contacted if there is one)."""
    root = lab.workdir_root
    if not (root / kept.KEPT_FILE).exists():
        return
    with kept.locked(root, lab.host):
        record = kept.read(root)
        kept.forget(root)
    if record is not None:
        _remove(lab, record[1])


def _remove(lab: Lab, env: Environment) -> None:
    """Remove what `env` names, each only if it still carries the kept run's label."""
    ledger = Ledger()
    ledger.record_environment(env)
    ledger.remove_all(lab.conn)


def _not_running(lab: Lab, env: Environment) -> str:
    """The first VM or network of `env` that does not run any more ("" if all do)."""
    # libvirt lists the active ones itself: asking each listed object (isActive) fails for one that
    # another session removed meanwhile
    libvirt = libvirt_module()
    running = {d.name() for d in lab.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    running |= {n.name() for n in lab.conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)}
    stopped = [f"VM {vm.role} ({vm.name})" for vm in env.vms if vm.name not in running]
    stopped += [f"network {net.name}" for net in env.networks if net.name not in running]
    return stopped[0] if stopped else ""
