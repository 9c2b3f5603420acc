"""The environment kept for ``--ost-reuse``: ``<workdir root>/kept.json``.

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
from pathlib import Path
from typing import Iterator, Optional

from .environment import Environment
from .files import host_lock, write_atomic

KEPT_FILE = "kept.json"  # in the work directory root


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """The work root's reuse lock: keep, attach, drop and forget hold it."""
    with host_lock("reuse-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]):
        yield


def read(root: Path) -> Optional[tuple[str, Environment]]:
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


def kept_run(root: Path) -> Optional[str]:
    """The run id kept.json names (read only, no lock: it is replaced atomically)."""
    try:
        return str(json.loads(json.loads((root / KEPT_FILE).read_text())["environment"])["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(root: Path, fingerprint: str, env: Environment) -> None:
    write_atomic(root / KEPT_FILE, json.dumps({"fingerprint": fingerprint, "environment": env.to_json()}))


def forget(root: Path) -> None:
    (root / KEPT_FILE).unlink(missing_ok=True)
