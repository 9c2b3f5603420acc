"""Who made a libvirt object or work directory, and whether that process still lives.

Every network, domain and work directory the plugin makes carries an owner label:
the run id, the owning process (pid and its start time, so a reused pid is not
mistaken for the owner), the host, the kernel's boot id and the owner's pid
namespace. Containers share a kernel and often a hostname and a libvirtd: a pid is
only meaningful inside its pid namespace and boot, so an owner in another
namespace, boot or host counts as alive. The reaper removes only what carries a
label whose process is certainly gone; anything else is not ours to touch.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from lxml import etree

from .files import write_atomic

METADATA_NS = "urn:pytest-ostimages:run:1"
METADATA_PREFIX = "ost"
OWNER_FILE = "owner.json"  # the label of a work directory
RUN_ID = re.compile(r"[0-9a-f]{8}")  # names a run: work directory, network and domain names


def process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces; start time is field 22
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot_id() -> str:
    """This kernel boot's random id: pids of another boot mean nothing here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_namespace(pid: Optional[int] = None) -> str:
    """The pid namespace of `pid` (default: this process), e.g. ``pid:[4026531836]``."""
    try:
        return os.readlink(f"/proc/{pid or 'self'}/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Label:
    """The owner of a libvirt object or work directory."""

    run_id: str
    pid: int
    host: str
    workdir: str
    role: str = ""
    started: int = 0
    boot: str = ""  # the kernel boot id when the label was made
    pidns: str = ""  # the owner's pid namespace

    @classmethod
    def current(cls, run_id: str, workdir: Path, pid: Optional[int] = None) -> "Label":
        """A label owned by `pid` (default: this process)."""
        pid = pid if pid is not None else os.getpid()
        return cls(run_id, pid, socket.gethostname(), str(workdir), "", process_start(pid) or 0,
                   boot_id(), pid_namespace())

    def with_role(self, role: str) -> "Label":
        return Label(self.run_id, self.pid, self.host, self.workdir, role, self.started,
                     self.boot, self.pidns)

    def same_run(self, other: "Label") -> bool:
        """Whether `other` labels an object of the same run (roles may differ)."""
        return self.with_role("") == other.with_role("")

    def owner_alive(self) -> bool:
        """False only when the owner is certainly gone.

        An owner on another host, in another pid namespace (another container) or
        from another boot cannot be checked from here, and counts as alive.
        """
        if self.host != socket.gethostname():
            return True
        if (self.boot and self.boot != boot_id()) or (self.pidns and self.pidns != pid_namespace()):
            return True
        started = process_start(self.pid)
        return started is not None and (not self.started or started == self.started)

    # --- libvirt <metadata> ---------------------------------------------------------

    def element(self) -> etree._Element:
        attrs = {"run-id": self.run_id, "pid": str(self.pid), "host": self.host,
                 "workdir": self.workdir, "started": str(self.started), "boot": self.boot,
                 "pidns": self.pidns}
        if self.role:
            attrs["role"] = self.role
        return etree.Element(f"{{{METADATA_NS}}}owner", attrs, nsmap={METADATA_PREFIX: METADATA_NS})

    @classmethod
    def from_xml(cls, xml: str) -> Optional["Label"]:
        """The label of a libvirt object's XML, None if it is not ours."""
        node = etree.fromstring(xml.encode()).find(f"metadata/{{{METADATA_NS}}}owner")
        if node is None:
            return None
        try:
            return cls(node.get("run-id", ""), int(node.get("pid", "0")), node.get("host", ""),
                       node.get("workdir", ""), node.get("role", ""), int(node.get("started", "0")),
                       node.get("boot", ""), node.get("pidns", ""))
        except ValueError:  # not a label we wrote: treat the object as not ours
            return None

    # --- work directories and state records ---------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Label":
        """A label from JSON; ValueError if it is not one we wrote."""
        names = {f.name: f.type for f in fields(cls)}
        if not isinstance(data, dict) or not {"run_id", "pid", "host", "workdir"} <= set(data) \
                or not set(data) <= set(names):
            raise ValueError(f"not an owner label: {data!r}")
        for key, value in data.items():
            wanted = int if key in ("pid", "started") else str
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"owner label field {key!r} should be {wanted.__name__}: {value!r}")
        return cls(**data)

    def write(self, directory: Path) -> None:
        write_atomic(directory / OWNER_FILE, json.dumps(self.to_dict()))

    @classmethod
    def read(cls, directory: Path) -> Optional["Label"]:
        try:
            return cls.from_dict(json.loads((directory / OWNER_FILE).read_text()))
        except (OSError, ValueError):
            return None
