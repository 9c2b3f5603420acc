"""Host-wide locks of this machine: the one place the plugin locks here.

Locks live in one host-wide directory, whatever ``--ost-workdir`` each session
uses, so that every session and xdist worker on the host agrees on subnets, boot
slots, kept environments and saved states. Lock files are opened without
following symlinks and made writable for every user, so that a second user on
the host shares them (or gets an error that says what to do). A remote
hypervisor's sessions lock in the same directory there (hypervisor/remote.py).

``OST_LOCK_DIR`` names another lock directory. It is for the plugin's own tests, so
that their sessions (pytester's inner ones too, which inherit it) leave nothing in
the real directory; it is read each time a lock is taken, not at import. Sessions
that do not agree on it do not see each other's locks: never set it for real runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from ..errors import OstError
from ..waiting import poll

LOCK_DIR = Path("/var/lock/pytest-ostimages")  # /var/lock is /run/lock: world-writable, sticky
LOCK_DIR_VARIABLE = "OST_LOCK_DIR"  # the tests' own lock directory (see the module's docstring)


def lock_dir() -> Path:
    """The host-wide lock directory, created (sticky, world-writable like /tmp) if missing."""
    override = os.environ.get(LOCK_DIR_VARIABLE)
    if override:
        directory = Path(override)
    elif LOCK_DIR.parent.is_dir():
        directory = LOCK_DIR
    else:
        directory = Path(tempfile.gettempdir()) / "pytest-ostimages-locks"
    try:
        directory.mkdir(mode=0o1777, exist_ok=True)
    except OSError as exc:
        raise OstError(f"Cannot create the host-wide lock directory {directory}: {exc.strerror}. "
                       f"Create it once as root: mkdir -m 1777 {directory}") from None
    if directory.is_symlink() or not directory.is_dir():
        raise OstError(f"{directory} should be a directory for pytest-ostimages' lock files, but "
                       f"it is a symlink or a file. Remove it: rm {directory}")
    if directory.stat().st_uid == os.getuid() and stat.S_IMODE(directory.stat().st_mode) != 0o1777:
        os.chmod(directory, 0o1777)  # whatever the umask: every user's sessions lock here
    return directory


def _open_lock(path: Path) -> int:
    """Open (create) lock file `path` for locking; never through a symlink."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OstError(f"The lock file {path} is a symlink; pytest-ostimages never follows "
                           f"one. Remove it: rm {path}") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            owner = _owner_of(path)
            raise OstError(f"Cannot open the lock file {path}{owner}: permission denied. Sessions "
                           f"of several users share these locks; make it writable for everyone "
                           f"(chmod 0666 {path}) or remove it.") from None
        raise OstError(f"Cannot open the lock file {path}: {exc.strerror}.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OstError(f"The lock file {path} is not a regular file; remove it.")
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o666:
        os.fchmod(fd, 0o666)  # other users' sessions lock it too
    return fd


def _owner_of(path: Path) -> str:
    try:
        import pwd

        uid = path.lstat().st_uid
        return f" (owned by {pwd.getpwuid(uid).pw_name})"
    except (OSError, KeyError):
        return ""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (any directory) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def host_lock(name: str) -> Iterator[None]:
    """Hold the host-wide lock `name` (e.g. "subnets") while the block runs."""
    with locked(lock_dir() / f"{name}.lock"):
        yield


@contextlib.contextmanager
def host_lock_if_free(name: str) -> Iterator[bool]:
    """Hold the host-wide lock `name` if nobody holds it; yields whether it is held."""
    fd = _open_lock(lock_dir() / f"{name}.lock")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def any_host_slot(prefix: str, count: int, abort: threading.Event,
                  poll_interval: float = 0.1) -> Iterator[float]:
    """Hold one of `count` host-wide locks ``<prefix>-<i>``; yields the seconds waited.

    Raises InterruptedError when `abort` is set while waiting.
    """
    directory = lock_dir()
    start = time.monotonic()

    def take_one() -> Optional[tuple[int]]:  # (fd,): fd 0 would read as false
        if abort.is_set():
            raise InterruptedError("the session was interrupted while waiting for a host-wide slot")
        for i in range(count):
            fd = _open_lock(directory / f"{prefix}-{i}.lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return (fd,)
        return None

    taken = poll(take_one, None, poll_interval)
    assert taken is not None  # polled for ever
    held = taken[0]
    try:
        yield time.monotonic() - start
    finally:
        os.close(held)
