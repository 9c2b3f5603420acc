"""The QEMU guest agent: commands that reach the guest without its network."""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

from ..errors import WarmStartError
from ..hypervisor.connection import libvirt_module
from ..waiting import poll

if TYPE_CHECKING:
    import libvirt


def agent_command(dom: "libvirt.virDomain", execute: str, arguments: dict[str, Any]) -> Any:
    import libvirt_qemu

    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": execute, "arguments": arguments}), 30, 0)
    return json.loads(reply)["return"]


def wait_for_agent(dom: "libvirt.virDomain", timeout: float) -> bool:
    """Whether the guest agent answers within `timeout` s (it may start after sshd in a booting guest)."""
    libvirt = libvirt_module()
    return bool(poll(lambda: agent_command(dom, "guest-ping", {}) is not None, timeout, 0.2,
                     retry_on=(libvirt.libvirtError,)))


def has_nic(dom: "libvirt.virDomain", mac: str) -> bool:
    """Whether the guest has a network interface with MAC `mac` (its kernel registered it)."""
    interfaces = agent_command(dom, "guest-network-get-interfaces", {})
    return any(i.get("hardware-address", "").lower() == mac.lower() for i in interfaces)


def clock_offset(dom: "libvirt.virDomain") -> int:
    """Nanoseconds the guest's clock is behind this host's (a restored guest's stopped at its save).

    guest-get-time is answered by the agent itself, at once: no process is started in the guest."""
    before = time.time_ns()
    guest = agent_command(dom, "guest-get-time", {})
    return (before + time.time_ns()) // 2 - int(guest)


def clock_script(offset_ns: int) -> str:
    """Shell that moves the guest's clock ahead by `offset_ns` from the time it reads as it runs: the
    agent of a busy guest may start it seconds after it was sent, and an absolute time would then set
    the clock that many seconds late. One `date` (coreutils') reads the clock and sets it."""
    sign = "-" if offset_ns < 0 else "+"
    seconds, nanoseconds = divmod(abs(offset_ns), 1_000_000_000)
    return f'date -u -s "now {sign}{seconds}.{nanoseconds:09d} seconds" >/dev/null\n'


def guest_exec(dom: "libvirt.virDomain", command: str, timeout: float = 60) -> None:
    """Run the shell script `command` in the guest through its agent, which needs no network."""
    pid = agent_command(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True})["pid"]
    status = poll(lambda: (lambda s: s if s.get("exited") else None)(agent_command(dom, "guest-exec-status",
                                                                                   {"pid": pid})),
                  timeout, 0.1)
    if status is None:
        raise WarmStartError(f"the script run in the guest by its agent did not finish within {timeout:.0f} s")
    if status.get("exitcode", 0) != 0:
        # what the script said is the news; the script itself is ours and long
        said = base64.b64decode(status.get("err-data", "") or status.get("out-data", "")).decode(errors="replace")
        tail = " | ".join(said.strip().splitlines()[-5:]) or "nothing on stderr"
        raise WarmStartError(f"the script run in the guest by its agent exited with {status.get('exitcode')}: {tail}")
