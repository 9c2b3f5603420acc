"""The one way anything is removed: by owner label, re-checked right before removal.

Every removal of the plugin (closing a lab, the reaper, ``--ost-reuse``,
``--ost-share``, ``--ost-cleanup``) goes through :func:`remove`, which looks the
object up again and removes it only if it still carries the label of the run that
asks: a libvirt object without our label, or with another run's, is left alone,
and a work directory must be a real directory directly inside the work root, owned
by this user, named after the run and labelled with it. Names and paths read from
a state file are never trusted on their own.

Leftovers of runs that died (kill -9, a crashed host) are found by label: a run
is gone when its current owner is (the owner in its work directory, which an
attaching ``--ost-reuse`` session takes over, else the object's own label),
unless it is the run kept for ``--ost-reuse``.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Optional

from . import virt
from .owner import RUN_ID, Label

if TYPE_CHECKING:
    import libvirt

KINDS = ("domain", "network", "workdir")


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


def remove(conn: Optional["libvirt.virConnect"], workdir_root: Path, item: Owned) -> bool:
    """Remove `item` if it is still what its label says; True if it was removed."""
    if item.kind == "workdir":
        folder = Path(item.name)
        if workdir_label(workdir_root, folder, item.label.run_id) is None:
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    if conn is None:
        return False
    libvirt = virt.libvirt_module()
    try:
        obj = (conn.lookupByName if item.kind == "domain" else conn.networkLookupByName)(item.name)
        found = Label.from_xml(obj.XMLDesc())
    except libvirt.libvirtError:  # gone already
        return False
    if found is None or not found.same_run(item.label):
        return False  # not ours (any more): never touched
    if item.kind == "domain":
        virt.remove_domain(obj)
    else:
        virt.remove_network(obj)
    return True


def workdir_label(workdir_root: Path, folder: Path, run_id: Optional[str] = None) -> Optional[Label]:
    """The label of `folder` if it is one of our work directories (of `run_id`), else None.

    Ours: a real directory (no symlink) directly inside `workdir_root`, named after
    a run id, owned by this user, whose owner file names that run.
    """
    if folder.parent != workdir_root or not RUN_ID.fullmatch(folder.name):
        return None
    if run_id is not None and folder.name != run_id:
        return None
    try:
        st = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    label = Label.read(folder)
    if label is None or label.run_id != folder.name:
        return None
    return label


def _current_owner(workdir_root: Path, label: Label) -> Label:
    """Who owns `label`'s run now: its work directory's owner if it has one."""
    adopted = workdir_label(workdir_root, workdir_root / label.run_id, label.run_id)
    return adopted if adopted is not None else label


def find(conn: "libvirt.virConnect", workdir_root: Path, spare: Collection[str] = ()) -> list[Leftover]:
    """Everything labelled by a run whose owner is gone, domains first.

    The runs in `spare` (the one kept for --ost-reuse) are not leftovers.
    """
    gone: dict[str, bool] = {}  # run id -> removable

    def removable(label: Label) -> bool:
        if label.run_id not in gone:
            owner = _current_owner(workdir_root, label)
            gone[label.run_id] = label.run_id not in spare and not owner.owner_alive()
        return gone[label.run_id]

    workdirs = []
    for folder in sorted(workdir_root.iterdir()) if workdir_root.is_dir() else []:
        label = workdir_label(workdir_root, folder)
        if label is not None and removable(label):
            workdirs.append(Leftover("workdir", str(folder), label))
    objects: list[Leftover] = []
    for kind, listing in (("domain", conn.listAllDomains()), ("network", conn.listAllNetworks())):
        for obj in listing:
            try:
                label = Label.from_xml(obj.XMLDesc())
            except virt.libvirt_error():  # removed meanwhile
                continue
            if label is not None and removable(label):
                objects.append(Leftover(kind, obj.name(), label))
    return objects + workdirs  # domains before the networks they use, files last


def reap(conn: "libvirt.virConnect", workdir_root: Path, spare: Collection[str] = ()) -> list[Leftover]:
    """Remove the leftovers of dead runs but `spare`; returns those removed."""
    return [item for item in find(conn, workdir_root, spare) if remove(conn, workdir_root, item)]
