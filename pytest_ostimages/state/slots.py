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
from typing import TYPE_CHECKING, Iterator, Optional

from ..hypervisor.host import LOCAL

if TYPE_CHECKING:
    from ..hypervisor.host import Host


class BootSlots:
    """`count` host-wide slots; None means one more than the CPUs, 0 no limit.

    CPUs + 1: measured on 2 cores under TCG, 3 VMs booting together were ready
    sooner than 2 + 1, and 9 together took minutes where waves of 2-3 took seconds each.
    """

    def __init__(self, count: Optional[int], host: "Host" = LOCAL) -> None:
        self.host = host  # whose CPUs boot the VMs: the slots are that hypervisor's
        self.count = _cpus(host) + 1 if count is None else count

    @contextlib.contextmanager
    def take(self, abort: threading.Event) -> Iterator[float]:
        """Hold a free slot while the block runs; yields the seconds spent waiting."""
        if self.count == 0:
            yield 0.0
            return
        with self.host.any_slot("boot-slot", self.count, abort) as waited:
            yield waited


def _cpus(host: "Host") -> int:
    """The hypervisor's CPUs (`nproc` there: a remote one's are not this machine's)."""
    if host.local:
        return os.cpu_count() or 1
    done = host.run(["nproc"])
    return int(done.text.strip()) if done.returncode == 0 and done.text.strip().isdigit() else 1
