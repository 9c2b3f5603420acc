"""Which hypervisor a session, or an xdist worker, runs its VMs on when several are given.

``--ost-libvirt-uri=qemu+ssh://a/system,qemu+ssh://b/system``: each one is asked what it
has free (memory, and CPUs for boot slots) and whether it can boot the session's VMs
(its libvirt answers, the images are there). The workers of one run place themselves
one after another under a lock, each counting what the workers before it took, so
that they spread by capacity rather than by position. A hypervisor that is down or
lacks the images is one clear error, within the connection's deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..config import OstConfig
from ..errors import SessionError
from ..hypervisor import connection as virt
from ..hypervisor.locks import locked
from ..images.catalog import Catalog
from ..parallel import each
from ..state.files import write_atomic


@dataclass(frozen=True)
class Capacity:
    uri: str
    free_mib: int  # memory the hypervisor has free now
    cpus: int  # its boot slots are CPUs + 1 (state/slots.py)


def probe(uri: str, config: OstConfig) -> Capacity:
    """What hypervisor `uri` has free; SessionError naming it if it cannot boot this session's VMs."""
    from ..hypervisor.remote import connect_host

    host = connect_host(uri)  # SSH first: a host that is down fails within its deadline, not libvirt's
    try:
        catalog = Catalog.discover(config.images_dir, host=host)
        if not catalog.distros() or (config.distro is not None and config.distro not in catalog.distros()):
            wanted = f"distro {config.distro}" if config.distro else "ost-images"
            raise SessionError(f"Hypervisor {uri} has no {wanted} installed in {config.images_dir} (it has: "
                               f"{', '.join(catalog.distros()) or 'none'}). Install them there, or leave it out of "
                               f"--ost-libvirt-uri.")
        conn = virt.connect(uri)
        try:
            free, cpus = conn.getFreeMemory() // 2**20, conn.getInfo()[2]
        finally:
            conn.close()
    finally:
        host.close()
    return Capacity(uri, int(free), int(cpus))


def choose(capacities: list[Capacity], placed: dict[str, list[int]], need_mib: int) -> str:
    """The hypervisor with the most room for `need_mib` more MiB and one more booting session, counting
    what is `placed` there already ([MiB, sessions] per URI); the first listed wins a tie."""
    def room(capacity: Capacity) -> tuple[bool, int, int]:
        mib, sessions = placed.get(capacity.uri, [0, 0])
        memory_left = capacity.free_mib - mib - need_mib
        return memory_left >= 0, capacity.cpus + 1 - sessions, memory_left

    return max(capacities, key=room).uri  # max keeps the first of equals


def place(config: OstConfig, need_mib: int, run_folder: Optional[Path] = None) -> OstConfig:
    """`config` with the hypervisor this session's VMs (`need_mib` MiB) run on; `run_folder`: a
    folder the xdist workers of this run share, where they count who went where."""
    if len(config.hypervisors) == 1:
        return dataclasses.replace(config, libvirt_uri=config.hypervisors[0])
    capacities = each(lambda uri: probe(uri, config), config.hypervisors)
    with _placements(run_folder) as placed:
        uri = choose(capacities, placed, need_mib)
        mib, sessions = placed.get(uri, [0, 0])
        placed[uri] = [mib + need_mib, sessions + 1]
    return dataclasses.replace(config, libvirt_uri=uri)


@contextlib.contextmanager
def _placements(run_folder: Optional[Path]) -> Iterator[dict[str, list[int]]]:
    """What this run's workers placed where so far (nothing, for a session of its own); saved after."""
    if run_folder is None:
        yield {}
        return
    run_folder.mkdir(parents=True, exist_ok=True)
    record = run_folder / "placements.json"
    with locked(run_folder / "placements.lock"):
        try:
            placed = json.loads(record.read_text())
        except (OSError, ValueError):
            placed = {}
        yield placed
        write_atomic(record, json.dumps(placed))


def share_name(config: OstConfig) -> str:
    """A short name for this session's hypervisor (one shared environment per hypervisor)."""
    return hashlib.sha256(config.libvirt_uri.encode()).hexdigest()[:8]
