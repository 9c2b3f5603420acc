"""Crash-safe state files: the one place the plugin writes state.

State files (share, reuse, owner labels) are written to a temporary file and
renamed over the old one: a crash mid-write leaves the old file or the new one,
never a truncated file that would read as "nothing kept". The locks that guard
them are this machine's (hypervisor/locks.py) or a hypervisor's (hypervisor/host.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..hypervisor.locks import LOCK_DIR, LOCK_DIR_VARIABLE, any_host_slot, host_lock, host_lock_if_free, lock_dir, locked

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath

__all__ = ["LOCK_DIR", "LOCK_DIR_VARIABLE", "any_host_slot", "host_lock", "host_lock_if_free", "lock_dir", "locked",
           "write_atomic"]


def write_atomic(path: "AnyPath", text: str, mode: int = 0o644) -> None:
    """Replace `path` (here, or a hypervisor's: host.HostPath) with `text` in one step: readers see
    the old or the new content. `mode`: 0o644 for what other users may read (names, public keys)."""
    if not isinstance(path, Path):  # a hypervisor's: SFTP's rename replaces atomically there (posix-rename)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            temporary.write_text(text)
            temporary.chmod(mode)
            temporary.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        return
    fd, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary_name, mode)
        os.replace(temporary_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary_name)
        raise
