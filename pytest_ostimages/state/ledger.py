"""The one way anything is removed: what a run owns, each object's label re-checked right before.

Every removal of the plugin (closing a lab, the reaper, ``--ost-reuse``,
``--ost-share``, ``--ost-cleanup``) goes through :func:`remove_all`, which looks
each object up again and removes it only if it still carries the label of the run
that asks: a libvirt object without our label, or with another run's, is left
alone, and a work directory must be a real directory named after the run, owned by
this user and labelled with it. Names and paths read from a state file are never
trusted on their own.

A :class:`Ledger` is what one run made, each object recorded before it exists (an
interrupt right after creating it still removes it). Leftovers of runs that died
(kill -9, a crashed host) are found by label (:func:`find`): a run is gone when its
current owner is, as the run's own work directory says (wherever that is), unless
it is kept for ``--ost-reuse``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from ..hypervisor import connection
from ..hypervisor.host import LOCAL
from ..parallel import each
from . import kept
from .owner import RUN_ID, Label, RunRecord

if TYPE_CHECKING:
    import libvirt

    from ..hypervisor.host import AnyPath, Host
    from .environment import Environment

# also the order of removal: a network outlives its domains; a run's folders go last
KINDS = ("domain", "network", "workdir", "clientdir")


@dataclass(frozen=True)
class Owned:
    """Something a run made: a domain, a network, the run's work directory (on the hypervisor),
    or, for a remote hypervisor, its local folder of access files (clientdir)."""

    kind: str  # one of KINDS
    name: str  # the libvirt name, or the folder's path
    label: Label  # the run it belongs to

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Leftover(Owned):
    """An object whose run is gone."""

    def __str__(self) -> str:
        return f"{self.kind} {self.name} (run {self.label.run_id}, pid {self.label.pid} gone)"


@dataclass(frozen=True)
class Spared(Owned):
    """An object of the plugin's that the reaper leaves, and why."""

    why: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name} (run {self.label.run_id}): {self.why}"


def run_workdir(folder: "AnyPath", run_id: Optional[str] = None, host: "Host" = LOCAL) -> Optional[RunRecord]:
    """The record of `folder` (on `host`) if it is a run's work directory (of `run_id`), else None.

    A run's: a real directory (no symlink) named after a run id, owned by this user,
    whose owner file names that run.
    """
    if not RUN_ID.fullmatch(folder.name) or (run_id is not None and folder.name != run_id):
        return None
    try:
        st = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != host.uid():
        return None
    record = RunRecord.read(folder)
    if record is None or record.owner.run_id != folder.name:
        return None
    return record


def remove(conn: Optional["libvirt.virConnect"], item: Owned, host: "Host" = LOCAL) -> bool:
    """Remove `item` if it is still what its label says; True if it was removed. A work directory
    is on the hypervisor `host`; a clientdir is this machine's."""
    if item.kind in ("workdir", "clientdir"):
        where = host if item.kind == "workdir" else LOCAL
        folder = where.path(item.name)
        if run_workdir(folder, item.label.run_id, where) is None:
            return False
        where.rmtree(folder)
        return True
    if conn is None:
        return False
    libvirt = connection.libvirt_module()
    try:
        obj = (conn.lookupByName if item.kind == "domain" else conn.networkLookupByName)(item.name)
        found = Label.from_xml(obj.XMLDesc())
    except libvirt.libvirtError:  # gone already
        return False
    if found is None or not found.same_run(item.label):
        return False  # not ours (any more): never touched
    connection.remove(obj)
    return True


def remove_all(conn: Optional["libvirt.virConnect"], items: Iterable[Owned], host: "Host" = LOCAL) -> list[Owned]:
    """Remove `items` (each through :func:`remove`), domains first and all at once (destroying
    one waits for its qemu to exit), then networks, then the run's folders; those removed."""
    items = list(items)
    removed = []
    for kind in KINDS:
        of_kind = [item for item in items if item.kind == kind]
        done = each(lambda item: remove(conn, item, host), of_kind) if kind == "domain" else \
            [remove(conn, item, host) for item in of_kind]
        removed += [item for item, ok in zip(of_kind, done) if ok]
    return removed


class Ledger:
    """What one run owns: recorded before each object exists, removed only through remove_all.
    Its work directory is on the hypervisor `host`."""

    def __init__(self, host: "Host" = LOCAL) -> None:
        self.host = host
        self._items: list[Owned] = []

    def record(self, kind: str, name: str, label: Label) -> None:
        self._items.append(Owned(kind, name, label))

    def record_environment(self, env: "Environment", client: Optional[Path] = None) -> None:
        """Everything `env` names, as owned by its run (an attached environment); `client` its local
        folder (a remote hypervisor's run)."""
        self.record("workdir", str(env.workdir), env.owner)
        if client is not None:
            self.record("clientdir", str(client), env.owner)
        for net in env.networks:
            self.record("network", net.name, env.owner)
        for vm in env.vms:
            self.record("domain", vm.name, env.owner)

    def __bool__(self) -> bool:
        return bool(self._items)

    def remove(self, conn: Optional["libvirt.virConnect"], kind: str, name: str) -> bool:
        """Remove one recorded object now (through remove(), its label checked) and forget it."""
        items = [item for item in self._items if (item.kind, item.name) == (kind, name)]
        self._items = [item for item in self._items if item not in items]
        return bool(remove_all(conn, items, self.host))

    def workdir(self) -> Optional[Owned]:
        return next((item for item in self._items if item.kind == "workdir"), None)

    def remove_all(self, conn: Optional["libvirt.virConnect"], keep_workdir: bool = False) -> None:
        """Remove everything recorded (the run's folders too unless `keep_workdir`), then forget it."""
        items, self._items = self._items, []
        remove_all(conn, [item for item in items if not (keep_workdir and item.kind in ("workdir", "clientdir"))],
                   self.host)

    def release(self) -> None:
        """Forget everything without removing it: it is left for others (a share, the next session)."""
        self._items = []


def why_alive(label: Label, host: "Host" = LOCAL) -> Optional[str]:
    """Why the run of `label` is not certainly gone, None if it is (its objects may then be removed).

    Asked of the run's own work directory on the hypervisor `host` (the one the label names,
    whatever the asking session's work root): its record, which an attaching session takes
    over, says who owns the run now and whether it is kept for --ost-reuse. What cannot be
    read or proven dead is alive, whoever owns it: a work directory of another user (its
    record, its kept.json, its owner's process may all be out of reach) or one that cannot
    be looked at. Only a directory that is gone leaves the label's own owner to decide.
    """
    folder = host.path(label.workdir)
    try:
        st = folder.lstat()
    except FileNotFoundError:
        return _owner_alive(label)
    except OSError:  # e.g. inside another user's private folder
        return f"its work directory {folder} cannot be looked at"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != host.uid():
        return f"its work directory {folder} is another user's"
    record = run_workdir(folder, label.run_id, host)
    if record is None:  # ours, without a record of this run: the label is all there is
        return _owner_alive(label)
    if record.kept and kept.kept_run(folder.parent) == label.run_id:
        return "kept for --ost-reuse (pytest --ost-cleanup under its work root removes it)"
    return _owner_alive(record.owner)


def _owner_alive(owner: Label) -> Optional[str]:
    if owner.owner_alive():
        here = owner.on_this_machine()
        return (f"its session (pid {owner.pid}) still runs" if here else
                f"its session runs on {owner.host}, another machine, and may be alive")
    return None


def run_gone(label: Label, host: "Host" = LOCAL) -> bool:
    """Whether the run of `label` is certainly gone (why_alive says nothing against it)."""
    return why_alive(label, host) is None


def find(conn: "libvirt.virConnect", workdir_root: "AnyPath", host: "Host" = LOCAL,
         client_root: Optional[Path] = None) -> tuple[list[Leftover], list[Spared]]:
    """Everything labelled by a run whose owner is gone (and that is not kept), domains first; and
    what is labelled but left, with why.

    Libvirt objects of any work root; work directories of `workdir_root` on the hypervisor `host`
    (and, for a remote hypervisor, this machine's folders of its runs under `client_root`).
    """
    verdicts: dict[str, Optional[str]] = {}  # run id -> why it is alive (None: gone)

    def alive(label: Label) -> Optional[str]:
        if label.run_id not in verdicts:
            verdicts[label.run_id] = why_alive(label, host)
        return verdicts[label.run_id]

    objects: list[Leftover] = []
    spared: list[Spared] = []
    for kind, listing in (("domain", conn.listAllDomains()), ("network", conn.listAllNetworks())):
        for obj in listing:
            try:
                label = Label.from_xml(obj.XMLDesc())
            except connection.libvirt_error():  # removed meanwhile
                continue
            if label is None:
                continue
            why = alive(label)
            if why is None:
                objects.append(Leftover(kind, obj.name(), label))
            else:
                spared.append(Spared(kind, obj.name(), label, why))
    folders = [("workdir", folder, host) for folder in _folders(workdir_root, host)]
    if client_root is not None and not host.local:
        folders += [("clientdir", folder, LOCAL) for folder in _folders(client_root, LOCAL)]
    for kind, folder, where in folders:
        record = run_workdir(folder, host=where)
        if record is None:
            continue
        # a run's local folder is gone with its owner (its work directory there says the rest)
        why = alive(record.owner) if kind == "clientdir" else \
            alive(Label(**{**record.owner.to_dict(), "workdir": str(folder)}))
        if why is None:
            objects.append(Leftover(kind, str(folder), record.owner))
    return objects, spared  # domains before the networks they use, folders last


def _folders(root: "AnyPath", host: "Host") -> list["AnyPath"]:
    """What is in `root`, a work root of this user's on `host` (another user's is not ours to look into)."""
    try:
        if root.lstat().st_uid != host.uid():
            return []
        return sorted(root.iterdir(), key=str)
    except OSError:  # none yet, or not readable
        return []


def reap(conn: "libvirt.virConnect", workdir_root: "AnyPath", host: "Host" = LOCAL,
         client_root: Optional[Path] = None) -> list[Leftover]:
    """Remove the leftovers of dead runs; returns those removed. A kept.json whose run is gone
    (its keeper died half-way, or it was removed) is forgotten too."""
    leftovers, _ = find(conn, workdir_root, host, client_root)
    removed = [item for item in remove_all(conn, leftovers, host) if isinstance(item, Leftover)]
    if kept.kept_run(workdir_root) is not None:
        with kept.locked(workdir_root, host):
            run_id = kept.kept_run(workdir_root)
            if run_id is not None and run_workdir(workdir_root / run_id, run_id, host) is None:
                kept.forget(workdir_root)
    return removed
