"""Leftovers of runs that died (kill -9, a crashed host): found by label, removed.

Only objects with an owner label whose process is gone are removed: domains
(destroyed and undefined), then networks, then work directories. Unlabelled
objects and objects of a live owner are never touched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import virt
from .owner import Label

if TYPE_CHECKING:
    import libvirt


@dataclass(frozen=True)
class Leftover:
    kind: str  # "domain", "network" or "workdir"
    name: str
    label: Label

    def __str__(self) -> str:
        return f"{self.kind} {self.name} (run {self.label.run_id}, pid {self.label.pid} gone)"


def find(conn: "libvirt.virConnect", workdir_root: Path) -> list[Leftover]:
    """Everything labelled by a run whose process is gone, domains first."""
    found = []
    for kind, objects in (("domain", conn.listAllDomains()), ("network", conn.listAllNetworks())):
        for obj in objects:
            try:
                label = Label.from_xml(obj.XMLDesc())
            except virt.libvirt_error():  # removed meanwhile
                continue
            if label is not None and not label.owner_alive():
                found.append(Leftover(kind, obj.name(), label))
    if workdir_root.is_dir():
        for folder in sorted(workdir_root.iterdir()):
            label = Label.read(folder) if folder.is_dir() else None
            if label is not None and not label.owner_alive():
                found.append(Leftover("workdir", str(folder), label))
    return found


def remove(conn: "libvirt.virConnect", leftovers: list[Leftover]) -> None:
    for item in leftovers:
        if item.kind == "domain":
            virt.remove_domain(conn, item.name)
        elif item.kind == "network":
            virt.remove_network(conn, item.name)
        else:
            shutil.rmtree(item.name, ignore_errors=True)


def reap(conn: "libvirt.virConnect", workdir_root: Path) -> list[Leftover]:
    leftovers = find(conn, workdir_root)
    remove(conn, leftovers)
    return leftovers
