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
from .owner import KEPT_FILE, KEPT_MARK, Label

if TYPE_CHECKING:
    import libvirt


@dataclass(frozen=True)
class Leftover:
    kind: str  # "domain", "network" or "workdir"
    name: str
    label: Label

    def __str__(self) -> str:
        return f"{self.kind} {self.name} (run {self.label.run_id}, pid {self.label.pid} gone)"


def find(conn: "libvirt.virConnect", workdir_root: Path, kept_too: bool = False) -> list[Leftover]:
    """Everything labelled by a run whose process is gone, domains first.

    Runs kept for --ost-reuse (a ``kept`` mark in their work directory) are not
    leftovers, unless `kept_too`.
    """
    workdirs, kept = [], set()
    for folder in sorted(workdir_root.iterdir()) if workdir_root.is_dir() else []:
        label = Label.read(folder) if folder.is_dir() else None
        if label is None or label.owner_alive():
            continue
        if (folder / KEPT_MARK).exists() and not kept_too:
            kept.add(label.run_id)
        else:
            workdirs.append(Leftover("workdir", str(folder), label))
    objects: list[Leftover] = []
    for kind, listing in (("domain", conn.listAllDomains()), ("network", conn.listAllNetworks())):
        for obj in listing:
            try:
                label = Label.from_xml(obj.XMLDesc())
            except virt.libvirt_error():  # removed meanwhile
                continue
            if label is not None and not label.owner_alive() and label.run_id not in kept:
                objects.append(Leftover(kind, obj.name(), label))
    return objects + workdirs  # domains before the networks they use, files last


def remove(conn: "libvirt.virConnect", leftovers: list[Leftover]) -> None:
    for item in leftovers:
        if item.kind == "domain":
            virt.remove_domain(conn, item.name)
        elif item.kind == "network":
            virt.remove_network(conn, item.name)
        else:
            shutil.rmtree(item.name, ignore_errors=True)


def reap(conn: "libvirt.virConnect", workdir_root: Path, kept_too: bool = False) -> list[Leftover]:
    leftovers = find(conn, workdir_root, kept_too)
    remove(conn, leftovers)
    if kept_too:
        (workdir_root / KEPT_FILE).unlink(missing_ok=True)
    return leftovers
