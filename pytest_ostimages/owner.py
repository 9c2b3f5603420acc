"""Who made a libvirt object or work directory, and whether that process still lives.

Every network, domain and work directory the plugin makes carries an owner label:
the run id, the owning process (pid and its start time, so a reused pid is not
mistaken for the owner) and the host. The reaper removes only what carries a label
whose process is gone; anything else is not ours to touch.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from lxml import etree

METADATA_NS = "urn:pytest-ostimages:run:1"
METADATA_PREFIX = "ost"
OWNER_FILE = "owner.json"  # the label of a work directory
KEPT_MARK = "kept"  # in a work directory: kept for --ost-reuse, not a leftover
KEPT_FILE = "kept.json"  # in the work directory root: what --ost-reuse can attach to


def process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces; start time is field 22
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Label:
    """The owner of a libvirt object or work directory."""

    run_id: str
    pid: int
    host: str
    workdir: str
    role: str = ""
    started: int = 0

    @classmethod
    def current(cls, run_id: str, workdir: Path, pid: Optional[int] = None) -> "Label":
        """A label owned by `pid` (default: this process)."""
        pid = pid if pid is not None else os.getpid()
        return cls(run_id, pid, socket.gethostname(), str(workdir), "", process_start(pid) or 0)

    def with_role(self, role: str) -> "Label":
        return Label(self.run_id, self.pid, self.host, self.workdir, role, self.started)

    def owner_alive(self) -> bool:
        """False only when the owner is certainly gone; another host's owner counts as alive."""
        if self.host != socket.gethostname():
            return True
        started = process_start(self.pid)
        return started is not None and (not self.started or started == self.started)

    # --- libvirt <metadata> ---------------------------------------------------------

    def element(self) -> etree._Element:
        attrs = {"run-id": self.run_id, "pid": str(self.pid), "host": self.host,
                 "workdir": self.workdir, "started": str(self.started)}
        if self.role:
            attrs["role"] = self.role
        return etree.Element(f"{{{METADATA_NS}}}owner", attrs, nsmap={METADATA_PREFIX: METADATA_NS})

    @classmethod
    def from_xml(cls, xml: str) -> Optional["Label"]:
        """The label of a libvirt object's XML, None if it is not ours."""
        node = etree.fromstring(xml.encode()).find(f"metadata/{{{METADATA_NS}}}owner")
        if node is None:
            return None
        return cls(node.get("run-id", ""), int(node.get("pid", "0")), node.get("host", ""),
                   node.get("workdir", ""), node.get("role", ""), int(node.get("started", "0")))

    # --- work directories -------------------------------------------------------------

    def write(self, directory: Path) -> None:
        (directory / OWNER_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, directory: Path) -> Optional["Label"]:
        try:
            return cls(**json.loads((directory / OWNER_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None
