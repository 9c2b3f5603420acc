"""The environment kept for ``--ost-reuse``: ``<workdir root>/kept.json``, on the hypervisor.

It holds the kept run's :class:`Environment` and a fingerprint of everything that
shaped it; the run's own work directory says "kept" too (owner.RunRecord), and the
reaper spares a run only while both do. Read and written under one host-wide lock
per work root, and written atomically: two sessions never attach to the same VMs,
and a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import TYPE_CHECKING, Iterator, Optional

from ..hypervisor.host import LOCAL
from .environment import Environment
from .files import write_atomic

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host

KEPT_FILE = "kept.json"  # in the work directory root


@contextlib.contextmanager
def locked(root: "AnyPath", host: "Host" = LOCAL) -> Iterator[None]:
    """The reuse lock of the work root `root` on the hypervisor `host`: keep, attach, drop and
    forget hold it."""
    with host.lock("reuse-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]):
        yield


def read(root: "AnyPath") -> Optional[tuple[str, Environment]]:
    """(fingerprint, environment) kept under `root`, None if none; one that does not validate is
    forgotten (hold the lock): its VMs are then the reaper's."""
    try:
        data = json.loads((root / KEPT_FILE).read_text())
        return str(data["fingerprint"]), Environment.from_json(data["environment"], root)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        forget(root)
        return None


def kept_run(root: "AnyPath") -> Optional[str]:
    """The run id kept.json names (read only, no lock: it is replaced atomically)."""
    try:
        return str(json.loads(json.loads((root / KEPT_FILE).read_text())["environment"])["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(root: "AnyPath", fingerprint: str, env: Environment) -> None:
    write_atomic(root / KEPT_FILE, json.dumps({"fingerprint": fingerprint, "environment": env.to_json()}))


def forget(root: "AnyPath") -> None:
    (root / KEPT_FILE).unlink(missing_ok=True)
