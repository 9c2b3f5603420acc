"""Fault injection for the plugin's own tests: a session killed at a named step.

``OST_FAULT_INJECT=<step>`` makes the session kill itself with SIGKILL when it reaches
that step (no teardown runs, as after ``kill -9`` or a crashed host), so that
tests/e2e/test_faults.py can show that the next session leaves nothing behind. The
variable is read when the step is reached; unset, a point costs a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "OST_FAULT_INJECT"
STEPS = (
    "network-defined", "network-started",  # hypervisor/connection.py
    "domain-defined", "domain-started",
    "ssh-wait",  # lab/booter.py: the domain runs, SSH is awaited
    "identity",  # guest/vm.py: the guest has its new host key, not yet pinned
    "deploy",  # ost/deploy.py: a deploy script is in the guest
    "warm-save",  # lab/warm.py: the memory is saved, the state not yet complete
    "warm-saved",  # lab/warm.py: at the end of the session, a state is complete, the VMs not yet removed
    "keep",  # lab/reuse.py: kept.json is written, the run's record does not say kept yet
    "adopt",  # lab/reuse.py: the run's record names this session, kept.json still names the run
)


def point(step: str) -> None:
    if os.environ.get(VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGKILL)
