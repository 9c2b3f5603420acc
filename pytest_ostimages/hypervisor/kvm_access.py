"""Can libvirt's qemu user open /dev/kvm? A warning for the report header.

When /dev/kvm exists but the user that ``qemu:///system`` runs qemu as cannot open
it, libvirt probes QEMU as root with KVM, then finds that the qemu user cannot use
KVM, logs "KVM was enabled when probing ..., but it is not available now", throws
its capability cache away and probes QEMU again (about 4 s) at every lookup. Guests
may still run under TCG; what suffers is every libvirt call: on the lab machines a
``virsh create`` took 52 s instead of 0.35 s and the example suite 141 s instead of
50 s. A host without udev (containers, minimal CI machines) leaves /dev/kvm
root:root 0600 and shows exactly this.

Nothing here may stop a run: facts that cannot be gathered give no warning.
"""

from __future__ import annotations

import grp
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import urlsplit

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
KVM_DEVICE = Path("/dev/kvm")
# The packaged defaults when qemu.conf sets no user: Debian's, then Fedora/EL's.
DEFAULT_USERS = ("libvirt-qemu", "qemu")

# `user = "libvirt-qemu"`; libvirt's conf strings take either quote. A leading #
# comments the line out, so it does not match.
_SETTING = re.compile(r"""^[ \t]*(user|group)[ \t]*=[ \t]*(["'])(.*?)\2""", re.MULTILINE)


@dataclass(frozen=True)
class QemuUser:
    """Who qemu runs as: the uid and every group libvirt gives the process."""

    name: str  # for messages: the user name, or "+<uid>" without a passwd entry
    uid: int
    gids: frozenset[int]


def applies_to(uri: str) -> bool:
    """Only a local system daemon runs qemu as its own user on this host."""
    parts = urlsplit(uri)
    return parts.scheme in ("qemu", "qemu+unix") and not parts.netloc and parts.path == "/system"


def can_open(st_mode: int, st_uid: int, st_gid: int, uid: int, gids: Iterable[int]) -> bool:
    """Whether `uid` with groups `gids` may open a node read-write (qemu opens /dev/kvm O_RDWR).

    The kernel's rule: root always; else the owner bits if the uid owns the node,
    else the group bits if the node's group is one of the user's, else the other bits.
    """
    if uid == 0:
        return True
    if uid == st_uid:
        wanted = stat.S_IRUSR | stat.S_IWUSR
    elif st_gid in set(gids):
        wanted = stat.S_IRGRP | stat.S_IWGRP
    else:
        wanted = stat.S_IROTH | stat.S_IWOTH
    return st_mode & wanted == wanted


def parse_qemu_conf(text: str) -> tuple[Optional[str], Optional[str]]:
    """(user, group) set in qemu.conf's text, None for a setting left at its default."""
    found: dict[str, str] = {}
    for match in _SETTING.finditer(text):
        found.setdefault(match.group(1), match.group(3))  # libvirt reads the first one
    return found.get("user"), found.get("group")


def _id(value: str, by_name: Callable[[str], int]) -> int:
    """A qemu.conf user or group: "+N" is a numeric id, anything else a name (libvirt's rule)."""
    if value.startswith("+"):
        return int(value[1:])
    try:
        return by_name(value)
    except KeyError:
        if value.isdigit():
            return int(value)
        raise


def _user_id(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _group_id(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _exists(by_name: Callable[[str], int], name: str) -> bool:
    try:
        by_name(name)
    except KeyError:
        return False
    return True


def resolve_user(user: Optional[str], group: Optional[str]) -> QemuUser:
    """The identity libvirt gives qemu for qemu.conf's `user`/`group` (None: packaged default).

    Like libvirt, the groups are the configured group plus the user's passwd group
    and every group that lists the user as a member. Raises KeyError when a name
    does not exist (libvirt itself would refuse to start then).
    """
    default = next((name for name in DEFAULT_USERS if _exists(_user_id, name)), None)
    if user is None:
        if default is None:
            raise KeyError("no qemu user: neither " + " nor ".join(DEFAULT_USERS) + " exists")
        user = default
    uid = _id(user, _user_id)
    gids: set[int] = set()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:  # a bare numeric id: no passwd entry, no supplementary groups
        name = f"+{uid}"
    else:
        name = entry.pw_name
        gids.add(entry.pw_gid)
        gids.update(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
    if group is None and default is not None and _exists(_group_id, default):
        group = default
    if group is not None:
        gids.add(_id(group, _group_id))
    return QemuUser(name, uid, frozenset(gids))


def qemu_user(qemu_conf: Path = QEMU_CONF) -> QemuUser:
    """The qemu user of the local system daemon. A missing qemu.conf means defaults, as in libvirt."""
    try:
        text = qemu_conf.read_text()
    except FileNotFoundError:
        text = ""
    return resolve_user(*parse_qemu_conf(text))


def _name(lookup: Callable[[int], str], id_: int) -> str:
    try:
        return lookup(id_)
    except KeyError:
        return str(id_)


def check(user: QemuUser, kvm: Path = KVM_DEVICE) -> Optional[str]:
    """The warning for `user` and the node `kvm`, None when it can open it or there is none."""
    try:
        node = kvm.stat()
    except FileNotFoundError:  # no KVM: libvirt does not probe with it, nothing to re-probe
        return None
    if can_open(node.st_mode, node.st_uid, node.st_gid, user.uid, user.gids):
        return None
    owner = _name(lambda uid: pwd.getpwuid(uid).pw_name, node.st_uid)
    group = _name(lambda gid: grp.getgrgid(gid).gr_name, node.st_gid)
    # Joining the node's group is a fix unless that group is root's.
    join = f", or add {user.name} to group {group}" if node.st_gid != 0 else ""
    return (f"WARNING: libvirt's qemu user {user.name} cannot open {kvm} "
            f"({owner}:{group} {stat.S_IMODE(node.st_mode):04o}): libvirt then re-probes QEMU "
            f"at every call (about 4 s each, boots up to 3x slower). Fix: chgrp kvm {kvm} && "
            f"chmod 0660 {kvm} (what udev does){join}; then restart libvirtd.")


def warning(uri: str, qemu_conf: Path = QEMU_CONF, kvm: Path = KVM_DEVICE) -> Optional[str]:
    """The header's warning for a session using `uri`, or None when fine, unknown or not applicable."""
    if not applies_to(uri):
        return None
    try:
        return check(qemu_user(qemu_conf), kvm)
    except (OSError, KeyError, ValueError):  # e.g. qemu.conf unreadable without root
        return None
