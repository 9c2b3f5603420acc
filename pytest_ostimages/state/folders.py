"""The folders a user's sessions keep their things in: work roots, the warm cache, custom layers.

Each is this user's own: made if missing, traversable by everyone (libvirt's qemu user
opens the disks inside by path) but listable by its owner only (mode 0711), so that
another user neither sees nor reaches what is inside except the files handed to qemu.
A folder that belongs to another user is an error that names it and says what to do:
each user has a work root of their own (config.default_workdir).
"""

from __future__ import annotations

import pwd
import stat
from typing import TYPE_CHECKING, Optional

from ..errors import SessionError
from ..hypervisor.host import LOCAL

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host

PRIVATE_ROOT = 0o711  # others may traverse to a file they are given, never list


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def own_folder(path: "AnyPath", what: str, option: str, host: "Host" = LOCAL) -> "AnyPath":
    """`path`, a folder of this user's on `host` (made with its parents if missing), mode 0711.

    `what` names it in errors ("work root"), `option` the setting that chooses it.
    """
    where = "" if host.local else f" on {host.name}"
    try:
        path.mkdir(mode=PRIVATE_ROOT, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise SessionError(f"Cannot create the {what} {path}{where}: {exc.strerror}. Choose a folder you may "
                           f"write with {option}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SessionError(f"The {what} {path}{where} is not a folder (a symlink or a file). Remove it, or "
                           f"choose another folder with {option}.")
    uid = host.uid()
    if st.st_uid != uid:
        me = user_name(uid) if host.local else f"uid {uid}"
        raise SessionError(f"The {what} {path}{where} belongs to {user_name(st.st_uid)}, not to you ({me}): each "
                           f"user needs one of their own (the default is /var/tmp/pytest-ostimages-<user>). Choose "
                           f"another with {option}, e.g. {option}=/var/tmp/pytest-ostimages-{user_name(uid)}.")
    if stat.S_IMODE(st.st_mode) != PRIVATE_ROOT:
        path.chmod(PRIVATE_ROOT)  # made by an earlier version (0755), or under another umask
    return path


def share_with_qemu(path: "AnyPath", qemu: Optional[tuple[int, int]], host: "Host" = LOCAL) -> None:
    """Let libvirt's qemu user (`qemu`: its uid and gid) read `path`, a file on `host` it opens as a
    backing file (libvirt relabels a VM's own disks, never what is below them): a saved state's
    disk, a checkpoint's frozen layer, a custom layer. They hold guest data (host keys, whatever
    the guest wrote), so nobody else may read them. Through qemu's group (0640, as root or a
    member of it), else a POSIX ACL for qemu's user. `qemu` None (libvirt does not say, e.g. its
    test driver): this user only."""
    if qemu is None:
        path.chmod(0o600)
        return
    uid, gid = qemu
    try:
        host.chown(path, -1, gid)
        path.chmod(0o640)
        return
    except PermissionError:  # neither root nor in qemu's group: an ACL entry for qemu's user
        pass
    path.chmod(0o600)
    try:
        host.set_reader_acl(path, uid)
    except OSError as exc:
        raise SessionError(f"Cannot let libvirt's qemu user (uid {uid}) read {path}: neither its group (gid {gid}) "
                           f"nor an ACL ({exc.strerror or exc}) can be set there. Run as root or as a member of that "
                           f"group, or put the work directory on a filesystem with ACLs.") from None
