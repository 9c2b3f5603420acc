"""Host-wide boot slots: how many VMs may boot at the same time.

Booting is CPU-bound (all the more under TCG emulation): nine guests booting at
once on two cores each get a fifth of a core and take minutes, two at a time
take seconds each. Every session and xdist worker on the host shares the same
slots, one lock file each, so the limit holds whoever boots.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import IO, Iterator, Optional


class BootSlots:
    """`count` slots under `directory`; None means one more than the CPUs, 0 no limit.

    CPUs + 1: measured on 2 cores under TCG, 3 VMs booting together were ready
    sooner than 2 + 1, and 9 together took minutes where waves of 2-3 took seconds each.
    """

    def __init__(self, directory: Path, count: Optional[int]) -> None:
        self.directory = directory
        self.count = (os.cpu_count() or 1) + 1 if count is None else count

    @contextlib.contextmanager
    def take(self, abort: threading.Event) -> Iterator[float]:
        """Hold a free slot while the block runs; yields the seconds spent waiting."""
        if self.count == 0:
            yield 0.0
            return
        start = time.monotonic()
        held = self._acquire(abort)
        try:
            yield time.monotonic() - start
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()

    def _acquire(self, abort: threading.Event) -> IO[str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        while not abort.is_set():
            for i in range(self.count):
                handle = open(self.directory / f"boot-slot-{i}.lock", "a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return handle
                except BlockingIOError:
                    handle.close()
            time.sleep(0.1)
        raise InterruptedError("the session was interrupted while waiting for a boot slot")
