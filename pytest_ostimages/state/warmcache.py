"""The host-wide cache of saved VM states for warm start: one folder per key, bounded in size.

A VM's state, ``<root>/<key>/`` (or ``<root>/<key>/<role>/`` inside an environment's),
holds ``disk.qcow2`` (the disk at the moment of the save, read-only, backed by the
installed image or by an earlier state's disk), ``disks/<dev>.qcow2`` (its extra
disks), ``VARS.fd`` (UEFI variables) and ``memory.save`` (libvirt's save image). An
environment's state (an OST topology deployed, a checkpoint fixture's end) holds one
such folder per VM and its ``meta.json``. States are saved atomically (a partial folder
renamed into place under the state's host-wide lock) and evicted least recently used
first, never one in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..hypervisor.host import LOCAL
from .files import write_atomic
from .folders import PRIVATE_ROOT, own_folder, share_with_qemu
from .owner import OWNER_FILE, RUN_ID

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host

USERS = "users"  # <state>/users/<id>: the runs (and later states) whose disks are backed by the state
PARTIAL = ".partial"  # a save in progress (or crashed)


def recipe_key(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SavedState:
    folder: "AnyPath"  # on the hypervisor

    @property
    def key(self) -> str:
        return self.folder.name

    @property
    def disk(self) -> "AnyPath":
        return self.folder / "disk.qcow2"

    @property
    def memory(self) -> "AnyPath":
        return self.folder / "memory.save"

    @property
    def nvram(self) -> "AnyPath":
        """The UEFI firmware's variables at the moment of the save (BIOS guests have none)."""
        return self.folder / "VARS.fd"

    def extra_disk(self, dev: str) -> "AnyPath":
        return self.folder / "disks" / f"{dev}.qcow2"

    @property
    def meta(self) -> "AnyPath":
        return self.folder / "meta.json"

    def exists(self) -> bool:
        return self.meta.is_file()

    def data(self) -> dict[str, Any]:
        return dict(json.loads(self.meta.read_text()))

    def host_key(self) -> str:
        return str(self.data()["host_key"])

    def vm(self, role: str) -> "SavedState":
        """The state of VM `role` inside an environment's state."""
        return SavedState(self.folder / role)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


class WarmCache:
    """``<root>/<key>/`` per saved state; bounded to `limit` bytes.

    One lock protocol, the state's host-wide lock ``warm-<key>``, held by every step
    that changes a state: saving it (a partial folder renamed into place), using it
    (a restore registers its run in ``users/``), and removing it (eviction, clear).
    A state is in use while the work directory of a run that registered it exists:
    the ledger removes that directory only after the run's VMs, so a state backing a
    running, kept (--ost-reuse) or shared (--ost-share) VM is never removed.
    """

    def __init__(self, root: "AnyPath", limit: int, qemu: Optional[tuple[int, int]] = None,
                 host: "Host" = LOCAL) -> None:
        self.root = root  # on the hypervisor `host`, as are its locks
        self.limit = limit
        self.qemu = qemu  # libvirt's qemu user, who reads the saved disks (folders.share_with_qemu)
        self.host = host

    def state(self, key: str) -> SavedState:
        return SavedState(self.root / key)

    def use(self, state: SavedState, user: "AnyPath") -> bool:
        """Register `user`, a run's work directory (its VMs' disks will be backed by `state`) or a
        later state's folder (its disks are), and mark `state` recently used; False if it is gone."""
        with self.host.lock(f"warm-{state.key}"):
            if not state.exists():
                return False
            users = state.folder / USERS
            users.mkdir(mode=0o700, exist_ok=True)
            # in use while this file exists: the run's owner record, or the later state's meta data
            marker = user / (OWNER_FILE if RUN_ID.fullmatch(user.name) else "meta.json")
            write_atomic(users / user.name, str(marker), mode=0o600)  # like all of a state's files
            _touch(self.host, state.meta)  # last use, for the least-recently-used eviction
            return True

    def in_use(self, state: SavedState) -> bool:
        """Whether a user that registered `state` is still there (hold the state's lock)."""
        for user in (state.folder / USERS).glob("*") if (state.folder / USERS).is_dir() else []:
            try:
                marker = self.host.path(user.read_text())
            except OSError:
                continue
            if marker.parent.name == user.name and marker.exists():
                return True
            user.unlink(missing_ok=True)  # that run has ended, or that state is gone
        return False

    def listing(self) -> list[tuple[SavedState, "dict[str, Any] | str"]]:
        """Every saved state with its meta data, or why that is damaged; least recently used first."""
        states = [s for s in (SavedState(p) for p in self.root.glob("*") if p.is_dir()) if s.exists()]
        return [(s, _meta_or_damage(s)) for s in sorted(states, key=lambda s: s.meta.stat().st_mtime)]

    def save(self, key: str, write: Callable[[Path], dict[str, Any]], progress: Callable[[str], None]) -> bool:
        """Save state `key`: `write(folder)` puts its files into a new folder and returns its meta
        data. Atomic: the folder becomes the state only once complete. False if it existed already."""
        state = self.state(key)
        with self.host.lock(f"warm-{key}"):
            if state.exists():
                return False  # another session saved it meanwhile
            partial = own_folder(self.root, "warm cache", "--ost-warm-dir", self.host) / f"{key}{PARTIAL}"
            self.host.rmtree(partial)  # a crashed save's (it held this lock)
            partial.mkdir(mode=PRIVATE_ROOT)
            partial.chmod(PRIVATE_ROOT)  # qemu's user reaches the disk in it; nobody lists it
            try:
                meta = write(partial)
            except BaseException:  # an interrupt too: nothing half-saved stays behind
                self.host.rmtree(partial)
                raise
            write_atomic(partial / "meta.json", json.dumps({"key": key, "saved": time.time(), **meta}))
            for path in partial.rglob("*"):
                # guest memory, disks and variables hold whatever the guest had: keys, passwords;
                # qemu's user (only) reads the disks: they back every restore's overlays
                if path.is_dir():
                    path.chmod(0o700 if path.name == USERS else PRIVATE_ROOT)
                elif path.suffix == ".qcow2":
                    share_with_qemu(path, self.qemu, self.host)
                else:
                    path.chmod(0o600)
            partial.replace(state.folder)
        self.evict(keep=key, progress=progress)
        return True

    def evict(self, keep: str, progress: Callable[[str], None]) -> None:
        """Least recently used states out until the cache fits; never one in use."""
        states = sorted((s for s in (SavedState(p) for p in self.root.glob("*")) if s.exists()),
                        key=lambda s: s.meta.stat().st_mtime)
        total = sum(s.size() for s in states)
        for state in states:
            if total <= self.limit:
                break
            size = state.size()  # measured before it is gone
            if state.key == keep or not self._remove_unused(state):
                continue
            total -= size
            progress(f"warm cache over {self.limit // 2**30} GiB: removed the least recently used state "
                     f"{state.key}")

    def clear(self) -> list[str]:
        """Remove every state not in use, and what crashed saves left (``--ost-cleanup --ost-warm-cache``)."""
        removed = []
        for folder in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if folder.name.endswith(PARTIAL):
                with self.host.lock(f"warm-{folder.name[:-len(PARTIAL)]}"):  # not one being saved now
                    self.host.rmtree(folder)
            elif SavedState(folder).exists() and self._remove_unused(SavedState(folder)):
                removed.append(folder.name)
        return removed

    def discard(self, state: SavedState) -> bool:
        """Remove `state`, found damaged, unless a run or a later state uses it: a new save
        of its key replaces it. Whether it was removed."""
        return self._remove_unused(state)

    def remove_crashed_saves(self) -> list[str]:
        """Remove what saves of sessions that died left (a partial folder no save holds the lock of)."""
        removed = []
        for folder in sorted(self.root.glob(f"*{PARTIAL}")) if self.root.is_dir() else []:
            with self.host.lock_if_free(f"warm-{folder.name[:-len(PARTIAL)]}") as free:
                if free:
                    self.host.rmtree(folder)
                    removed.append(folder.name)
        return removed

    def _remove_unused(self, state: SavedState) -> bool:
        with self.host.lock(f"warm-{state.key}"):
            if not state.exists() or self.in_use(state):
                return False
            self.host.rmtree(state.folder)
            return True


# The meta data a listing shows, with its type (what a save writes; any field may be absent).
META_FIELDS: dict[str, tuple["type | tuple[type, ...]", str]] = {
    "saved": ((int, float), "a number"), "kind": (str, "a string"), "name": (str, "a string"),
    "role": (str, "a string"), "image": (str, "a string"), "roles": (list, "a list"),
    "inputs": (dict, "an object"), "parent": (str, "a string")}


def _meta_or_damage(state: SavedState) -> "dict[str, Any] | str":
    """The meta data of `state`, or why it cannot be used (a save cut short, a file edited by hand)."""
    try:
        meta = json.loads(state.meta.read_bytes())
    except OSError as exc:
        return f"meta.json cannot be read ({exc.strerror})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return f"meta.json is not JSON ({exc})"
    if not isinstance(meta, dict):
        return f"meta.json holds {'a list' if isinstance(meta, list) else repr(meta)}, not an object"
    for field, (kind, name) in META_FIELDS.items():
        if meta.get(field) is not None and not isinstance(meta[field], kind):
            return f"meta.json's {field!r} is {meta[field]!r}, not {name}"
    return meta


def _touch(host: "Host", path: "AnyPath") -> None:
    """Its modification time now (SFTP has no utime of its own in pathlib's words: touch there)."""
    if host.local:
        os.utime(str(path))
    else:
        host.run(["touch", "-c", str(path)])
