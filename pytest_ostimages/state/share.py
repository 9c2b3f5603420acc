"""One environment for every xdist worker of a run (``--ost-share``).

The first worker to get the lock boots the VMs (and runs an OST suite's deploy
scripts) and writes the environment record that the others attach to, every
network and NIC in it; if its boot fails it writes the error instead, and
every other worker fails with it at once rather than booting again. Each worker
counts itself in and out, and the last one out removes everything, whichever
worker booted it. The objects are labelled with the xdist controller's pid, which
lives as long as the run, so the reaper of another run never takes them while a
worker still uses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

from ..errors import OstError, SessionError
from .environment import Environment
from .files import locked, write_atomic


class SharedLab(Protocol):
    """What a share needs of a worker's lab (lab.Lab)."""

    @property
    def workdir_root(self) -> Path: ...

    def environment(self) -> Environment: ...

    def attach(self, env: Environment) -> None: ...

    def close(self) -> None: ...

    def release(self) -> None: ...


class Share:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = directory / "lock"
        self.state = directory / "environment.json"
        self.failure = directory / "failure.txt"
        self.users = directory / "users"
        self.joined = False

    def join(self, lab: SharedLab, provision: Callable[[], object]) -> None:
        """Provision the environment with `provision` (boot, and run an OST suite's deploy
        scripts) if nobody has yet, else attach to the one provisioned."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked(self.lock):
            if self.failure.exists():
                raise SessionError(f"The shared environment could not be booted by another worker:\n"
                               f"{self.failure.read_text()}")
            if self.state.exists():
                try:
                    env = Environment.from_json(self.state.read_text(), lab.workdir_root)
                except ValueError as exc:
                    raise SessionError(f"The shared environment's record {self.state} is damaged "
                                   f"({exc}); the run cannot attach to it.") from None
                lab.attach(env)
            else:
                try:
                    provision()
                except OstError as exc:
                    write_atomic(self.failure, str(exc))
                    raise
                write_atomic(self.state, lab.environment().to_json())
            write_atomic(self.users, str(self._count() + 1))
            self.joined = True

    def leave(self, lab: SharedLab) -> None:
        """Count out; the last one removes the environment."""
        with locked(self.lock):
            left = self._count() - 1
            write_atomic(self.users, str(left))
            if left <= 0:
                self.state.unlink(missing_ok=True)
                lab.close()
            else:
                lab.release()

    def _count(self) -> int:
        try:
            return int(json.loads(self.users.read_text()))
        except (OSError, ValueError, TypeError):
            return 0
