"""Who made a libvirt object or work directory, and whether that owner still lives.

Every network, domain and work directory the plugin makes carries an owner label:
the run id, the owning process (pid and its start time since the kernel's boot, so a
reused pid is not mistaken for the owner, whatever the wall clock does), the host, the
kernel's boot id and the owner's pid namespace. Containers share a kernel and often a
hostname and a libvirtd: a pid is only meaningful inside its pid namespace and boot, so
an owner in another namespace, boot or host counts as alive.

Who owns a run *now* is written in its work directory (:class:`RunRecord`,
``owner.json``): the label of the process that owns it, which a session attaching
with ``--ost-reuse`` replaces in one atomic step, or "kept for --ost-reuse". The
reaper reads that record through the work directory each label names, so the
answer is the same whatever ``--ost-workdir`` the asking session uses.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import psutil
from lxml import etree

from .files import write_atomic

METADATA_NS = "urn:pytest-ostimages:run:1"
METADATA_PREFIX = "ost"
OWNER_FILE = "owner.json"  # the RunRecord of a work directory
RUN_ID = re.compile(r"[0-9a-f]{8}")  # names a run: work directory, network and domain names
START_TOLERANCE = 0.015  # seconds: the kernel counts start times in clock ticks (1/100 s)
# Labels of earlier versions held only the start time since the epoch, which psutil derives
# from /proc/stat's btime: whole seconds that follow the wall clock (NTP, a resumed VM), so it
# moves by up to a second; and before that, clock ticks (below LEGACY_START), nothing to compare.
EPOCH_TOLERANCE = 2.0
LEGACY_START = 10**9


def process_start(pid: int) -> tuple[float, float]:
    """When `pid` started: seconds since the epoch (for people) and since this kernel's boot
    (exact: no step of the wall clock moves it); zeros if it cannot be read."""
    try:
        return round(psutil.Process(pid).create_time(), 2), _since_boot(pid)
    except (psutil.Error, OSError):
        return 0.0, 0.0


def _since_boot(pid: int) -> float:
    """When `pid` started, in seconds since this kernel's boot: /proc/PID/stat's starttime (clock
    ticks; psutil's create_time adds btime to it, which moves with the wall clock)."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round(int(after_name[19]) / os.sysconf("SC_CLK_TCK"), 2)


def process_alive(pid: int, since_boot: float, started: float = 0.0) -> bool:
    """False only when `pid` is certainly not the process that started `since_boot` seconds after
    this kernel's boot (0: compare `started`, an earlier version's seconds since the epoch; 0: any).

    A process hidden from us (``/proc`` mounted with ``hidepid``, another user's) or
    whose start time cannot be read counts as alive: not knowing is not "gone".
    """
    if pid <= 0 or not _exists(pid):
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # it has exited; its parent did not wait yet
            return False
        created = _since_boot(pid) if since_boot else process.create_time()
    except (psutil.NoSuchProcess, FileNotFoundError):  # the kernel has it, /proc hides it (hidepid), or it just ended
        return _exists(pid)
    except (psutil.AccessDenied, OSError):
        return True
    if since_boot:
        return abs(created - since_boot) < START_TOLERANCE
    if not started or started < LEGACY_START:  # nothing to compare with
        return True
    return abs(created - started) < EPOCH_TOLERANCE


def _exists(pid: int) -> bool:
    """The kernel's answer, whoever owns the process: ``kill(pid, 0)`` fails with ESRCH only when
    there is none (psutil.pid_exists looks in /proc, where hidepid hides other users' processes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def boot_id() -> str:
    """This kernel boot's random id: pids of another boot mean nothing here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def client_id() -> str:
    """This machine among the clients of a remote hypervisor: its host name and machine id (host names
    repeat across containers; /etc/machine-id does not, else the boot id stands in)."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    return f"{socket.gethostname()}-{(machine or boot_id()).replace('-', '')[:12]}"


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
    started: float = 0.0  # the owner's start time (seconds since the epoch), for people
    boot: str = ""  # the kernel boot id when the label was made
    pidns: str = ""  # the owner's pid namespace
    since_boot: float = 0.0  # the owner's start time (seconds since that boot): which process it is

    @classmethod
    def current(cls, run_id: str, workdir: Path, pid: Optional[int] = None) -> "Label":
        """A label owned by `pid` (default: this process)."""
        pid = pid if pid is not None else os.getpid()
        started, since_boot = process_start(pid)
        return cls(run_id, pid, socket.gethostname(), str(workdir), "", started, boot_id(), pid_namespace(),
                   since_boot)

    def with_role(self, role: str) -> "Label":
        return replace(self, role=role)

    def same_run(self, other: "Label") -> bool:
        """Whether `other` labels an object of the same run (roles may differ)."""
        return self.with_role("") == other.with_role("")

    def on_this_machine(self) -> bool:
        """Whether the owner ran on this machine, in this boot and pid namespace (its pid means something here)."""
        return (self.host == socket.gethostname() and (not self.boot or self.boot == boot_id())
                and (not self.pidns or self.pidns == pid_namespace()))

    def owner_alive(self) -> bool:
        """False only when the owner is certainly gone.

        An owner on another host, in another pid namespace (another container) or
        from another boot cannot be checked from here, and counts as alive.
        """
        if self.host != socket.gethostname():
            return True
        if (self.boot and self.boot != boot_id()) or (self.pidns and self.pidns != pid_namespace()):
            return True
        return process_alive(self.pid, self.since_boot, self.started)

    # --- libvirt <metadata> ---------------------------------------------------------

    def element(self) -> etree._Element:
        attrs = {"run-id": self.run_id, "pid": str(self.pid), "host": self.host,
                 "workdir": self.workdir, "started": f"{self.started:.2f}", "boot": self.boot,
                 "pidns": self.pidns, "since-boot": f"{self.since_boot:.2f}"}
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
                       node.get("workdir", ""), node.get("role", ""), float(node.get("started", "0")),
                       node.get("boot", ""), node.get("pidns", ""), float(node.get("since-boot", "0")))
        except ValueError:  # not a label we wrote: treat the object as not ours
            return None

    # --- work directories and state records ---------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Label":
        """A label from JSON; ValueError if it is not one we wrote."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"run_id", "pid", "host", "workdir"} <= set(data) \
                or not set(data) <= names:
            raise ValueError(f"not an owner label: {data!r}")
        for key, value in data.items():
            wanted: Any = int if key == "pid" else (int, float) if key in ("started", "since_boot") else str
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"owner label field {key!r} has the wrong type: {value!r}")
        return cls(**{**data, "started": float(data.get("started", 0)),
                      "since_boot": float(data.get("since_boot", 0))})

    def write(self, directory: Path) -> None:
        """Make this label the owner of the run whose work directory is `directory`."""
        RunRecord(self).write(directory)

    @classmethod
    def read(cls, directory: Path) -> Optional["Label"]:
        record = RunRecord.read(directory)
        return record.owner if record is not None else None


@dataclass(frozen=True)
class RunRecord:
    """Who owns a run now, as its work directory says (``owner.json``).

    `kept`: the run is kept for ``--ost-reuse`` (its owner has ended on purpose); the
    reaper spares it while the work root's kept.json names it too.
    """

    owner: Label
    kept: bool = False

    def write(self, directory: Path) -> None:
        """Replace the record in one step: readers see the old owner or the new one."""
        write_atomic(directory / OWNER_FILE, json.dumps({"owner": self.owner.to_dict(), "kept": self.kept}))

    @classmethod
    def read(cls, directory: Path) -> Optional["RunRecord"]:
        try:
            data = json.loads((directory / OWNER_FILE).read_text())
            if isinstance(data, dict) and "owner" in data:
                if not isinstance(data.get("kept", False), bool):
                    return None
                return cls(Label.from_dict(data["owner"]), data.get("kept", False))
            return cls(Label.from_dict(data))  # written by an earlier version: the label alone
        except (OSError, ValueError):
            return None
