"""Host-wide boot slots: how many VMs may boot at the same time.

Booting is CPU-bound (all the more under TCG emulation): nine guests booting at
once on two cores each get a fifth of a core and take minutes, two at a time
take seconds each. Every session and xdist worker on the host shares the same
slots (host-wide lock files, whatever the work directory), so the limit holds
whoever boots.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

from .files import any_host_slot


class BootSlots:
    """`count` host-wide slots; None means one more than the CPUs, 0 no limit.

    CPUs + 1: measured on 2 cores under TCG, 3 VMs booting together were ready
    sooner than 2 + 1, and 9 together took minutes where waves of 2-3 took seconds each.
    """

    def __init__(self, count: Optional[int]) -> None:
        self.count = (os.cpu_count() or 1) + 1 if count is None else count

    @contextlib.contextmanager
    def take(self, abort: threading.Event) -> Iterator[float]:
        """Hold a free slot while the block runs; yields the seconds spent waiting."""
        if self.count == 0:
            yield 0.0
            return
        with any_host_slot("boot-slot", self.count, abort) as waited:
            yield waited
