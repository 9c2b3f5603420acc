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

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from ..hypervisor import connection
from ..parallel import each
from . import kept
from .owner import RUN_ID, Label, RunRecord

if TYPE_CHECKING:
    import libvirt

    from .environment import Environment

KINDS = ("domain", "network", "workdir")  # also the order of removal: a network outlives its domains


@dataclass(frozen=True)
class Owned:
    """Something a run made: a domain, a network or the run's work directory."""

    kind: str  # one of KINDS
    name: str  # the libvirt name, or the work directory's path
    label: Label  # the run it belongs to

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Leftover(Owned):
    """An object whose run is gone."""

    def __str__(self) -> str:
        return f"{self.kind} {self.name} (run {self.label.run_id}, pid {self.label.pid} gone)"


def run_workdir(folder: Path, run_id: Optional[str] = None) -> Optional[RunRecord]:
    """The record of `folder` if it is a run's work directory (of `run_id`), else None.

    A run's: a real directory (no symlink) named after a run id, owned by this user,
    whose owner file names that run.
    """
    if not RUN_ID.fullmatch(folder.name) or (run_id is not None and folder.name != run_id):
        return None
    try:
        st = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    record = RunRecord.read(folder)
    if record is None or record.owner.run_id != folder.name:
        return None
    return record


def workdir_label(workdir_root: Path, folder: Path, run_id: Optional[str] = None) -> Optional[Label]:
    """The owner of `folder` if it is one of our work directories directly inside `workdir_root`."""
    record = run_workdir(folder, run_id) if folder.parent == workdir_root else None
    return record.owner if record is not None else None


def remove(conn: Optional["libvirt.virConnect"], item: Owned) -> bool:
    """Remove `item` if it is still what its label says; True if it was removed."""
    if item.kind == "workdir":
        folder = Path(item.name)
        if run_workdir(folder, item.label.run_id) is None:
            return False
        shutil.rmtree(folder, ignore_errors=True)
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


def remove_all(conn: Optional["libvirt.virConnect"], items: Iterable[Owned]) -> list[Owned]:
    """Remove `items` (each through :func:`remove`), domains first and all at once (destroying
    one waits for its qemu to exit), then networks, then work directories; those removed."""
    items = list(items)
    removed = []
    for kind in KINDS:
        of_kind = [item for item in items if item.kind == kind]
        done = each(lambda item: remove(conn, item), of_kind) if kind == "domain" else \
            [remove(conn, item) for item in of_kind]
        removed += [item for item, ok in zip(of_kind, done) if ok]
    return removed


class Ledger:
    """What one run owns: recorded before each object exists, removed only through remove_all."""

    def __init__(self) -> None:
        self._items: list[Owned] = []

    def record(self, kind: str, name: str, label: Label) -> None:
        self._items.append(Owned(kind, name, label))

    def record_environment(self, env: "Environment") -> None:
        """Everything `env` names, as owned by its run (an attached environment)."""
        self.record("workdir", str(env.workdir), env.owner)
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
        return bool(remove_all(conn, items))

    def workdir(self) -> Optional[Owned]:
        return next((item for item in self._items if item.kind == "workdir"), None)

    def remove_all(self, conn: Optional["libvirt.virConnect"], keep_workdir: bool = False) -> None:
        """Remove everything recorded (the work directory too unless `keep_workdir`), then forget it."""
        items, self._items = self._items, []
        remove_all(conn, [item for item in items if not (keep_workdir and item.kind == "workdir")])

    def release(self) -> None:
        """Forget everything without removing it: it is left for others (a share, the next session)."""
        self._items = []


def run_gone(label: Label) -> bool:
    """Whether the run of `label` is certainly gone, so that its objects may be removed.

    Asked of the run's own work directory (the one the label names, whatever the asking
    session's work root): its record, which an attaching session takes over, says who owns
    the run now and whether it is kept for --ost-reuse. What cannot be read or proven dead
    is alive, whoever owns it: a work directory of another user (its record, its kept.json,
    its owner's process may all be out of reach) or one that cannot be looked at. Only a
    directory that is gone leaves the label's own owner to decide.
    """
    folder = Path(label.workdir)
    try:
        st = folder.lstat()
    except FileNotFoundError:
        return not label.owner_alive()
    except OSError:  # e.g. inside another user's private folder
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False  # another user's run (or not a run's directory at all): not ours to judge
    record = run_workdir(folder, label.run_id)
    if record is None:  # ours, without a record of this run: the label is all there is
        return not label.owner_alive()
    if record.kept and kept.kept_run(folder.parent) == label.run_id:
        return False
    return not record.owner.owner_alive()


def find(conn: "libvirt.virConnect", workdir_root: Path) -> list[Leftover]:
    """Everything labelled by a run whose owner is gone (and that is not kept), domains first.

    Libvirt objects of any work root; work directories of `workdir_root`.
    """
    gone: dict[str, bool] = {}  # run id -> removable

    def removable(label: Label) -> bool:
        if label.run_id not in gone:
            gone[label.run_id] = run_gone(label)
        return gone[label.run_id]

    objects: list[Leftover] = []
    for kind, listing in (("domain", conn.listAllDomains()), ("network", conn.listAllNetworks())):
        for obj in listing:
            try:
                label = Label.from_xml(obj.XMLDesc())
            except connection.libvirt_error():  # removed meanwhile
                continue
            if label is not None and removable(label):
                objects.append(Leftover(kind, obj.name(), label))
    for folder in _folders(workdir_root):
        record = run_workdir(folder)
        if record is not None and removable(Label(**{**record.owner.to_dict(), "workdir": str(folder)})):
            objects.append(Leftover("workdir", str(folder), record.owner))
    return objects  # domains before the networks they use, files last


def _folders(root: Path) -> list[Path]:
    """What is in `root`, a work root of this user's (another user's is not ours to look into)."""
    try:
        if root.lstat().st_uid != os.getuid():
            return []
        return sorted(root.iterdir())
    except OSError:  # none yet, or not readable
        return []


def reap(conn: "libvirt.virConnect", workdir_root: Path) -> list[Leftover]:
    """Remove the leftovers of dead runs; returns those removed. A kept.json whose run is gone
    (its keeper died half-way, or it was removed) is forgotten too."""
    removed = [item for item in remove_all(conn, find(conn, workdir_root)) if isinstance(item, Leftover)]
    if kept.kept_run(workdir_root) is not None:
        with kept.locked(workdir_root):
            run_id = kept.kept_run(workdir_root)
            if run_id is not None and run_workdir(workdir_root / run_id, run_id) is None:
                kept.forget(workdir_root)
    return removed
