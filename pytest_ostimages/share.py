"""One environment for every xdist worker of a run (``--ost-share``).

The first worker to get the lock boots the VMs and writes what the others need
to attach; each worker counts itself in and out, and the last one out removes
everything, whichever worker booted it. The objects are labelled with the xdist
controller's pid, which lives as long as the run, so the reaper of another run
never takes them while a worker still uses them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .lab import Lab, VMSpec
from .virt import file_lock


class Share:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = directory / "lock"
        self.state = directory / "state.json"
        self.users = directory / "users"
        self.joined = False

    def join(self, lab: Lab, specs: list[VMSpec]) -> None:
        """Boot `specs` if nobody has yet, else attach to the booted ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock):
            if self.state.exists():
                lab.attach(json.loads(self.state.read_text()))
            else:
                lab.boot(specs)
                self.state.write_text(json.dumps(lab.describe()))
            self.users.write_text(str(self._count() + 1))
            self.joined = True

    def leave(self, lab: Lab) -> None:
        """Count out; the last one removes the environment."""
        with file_lock(self.lock):
            left = self._count() - 1
            self.users.write_text(str(left))
            if left <= 0:
                self.state.unlink(missing_ok=True)
                lab.close()
            else:
                lab.release()

    def _count(self) -> int:
        try:
            return int(self.users.read_text())
        except (OSError, ValueError):
            return 0
