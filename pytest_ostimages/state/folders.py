"""The folders a user's sessions keep their things in: work roots, the warm cache, custom layers.

Each is this user's own: made if missing, traversable by everyone (libvirt's qemu user
opens the disks inside by path) but listable by its owner only (mode 0711), so that
another user neither sees nor reaches what is inside except the files handed to qemu.
A folder that belongs to another user is an error that names it and says what to do:
each user has a work root of their own (config.default_workdir).
"""

from __future__ import annotations

import os
import pwd
import stat
import struct
from pathlib import Path
from typing import Optional

from ..errors import SessionError

PRIVATE_ROOT = 0o711  # others may traverse to a file they are given, never list


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def own_folder(path: Path, what: str, option: str) -> Path:
    """`path`, a folder of this user's (made with its parents if missing), mode 0711.

    `what` names it in errors ("work root"), `option` the setting that chooses it.
    """
    try:
        path.mkdir(mode=PRIVATE_ROOT, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise SessionError(f"Cannot create the {what} {path}: {exc.strerror}. Choose a folder you may "
                       f"write with {option}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SessionError(f"The {what} {path} is not a folder (a symlink or a file). Remove it, or "
                       f"choose another folder with {option}.")
    if st.st_uid != os.getuid():
        me = user_name(os.getuid())
        raise SessionError(f"The {what} {path} belongs to {user_name(st.st_uid)}, not to you ({me}): each user "
                       f"needs one of their own (the default is /var/tmp/pytest-ostimages-<user>). Choose "
                       f"another with {option}, e.g. {option}=/var/tmp/pytest-ostimages-{me}.")
    if stat.S_IMODE(st.st_mode) != PRIVATE_ROOT:
        os.chmod(path, PRIVATE_ROOT)  # made by an earlier version (0755), or under another umask
    return path


def share_with_qemu(path: Path, qemu: Optional[tuple[int, int]]) -> None:
    """Let libvirt's qemu user (`qemu`: its uid and gid) read `path`, a file it opens as a backing
    file (libvirt relabels a VM's own disks, never what is below them): a saved state's disk, a
    checkpoint's frozen layer, a custom layer. They hold guest data (host keys, whatever the
    guest wrote), so nobody else may read them. Through qemu's group (0640, as root or a member
    of it), else a POSIX ACL for qemu's user. `qemu` None (libvirt does not say, e.g. its test
    driver): this user only."""
    if qemu is None:
        path.chmod(0o600)
        return
    uid, gid = qemu
    try:
        os.chown(path, -1, gid)
        path.chmod(0o640)
        return
    except PermissionError:  # neither root nor in qemu's group: an ACL entry for qemu's user
        pass
    path.chmod(0o600)
    try:
        os.setxattr(path, "system.posix_acl_access", _acl_with_reader(uid))
    except OSError as exc:
        raise SessionError(f"Cannot let libvirt's qemu user (uid {uid}) read {path}: neither its group (gid {gid}) "
                           f"nor an ACL ({exc.strerror}) can be set here. Run as root or as a member of that group, "
                           f"or put --ost-workdir on a filesystem with ACLs.") from None


def _acl_with_reader(uid: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr format, version 2): rw for the owner, r for `uid`,
    nothing for the group and others."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, 4, uid), (0x04, 0, undefined), (0x10, 4, undefined), (0x20, 0, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, id_) for tag, perm, id_ in entries)
