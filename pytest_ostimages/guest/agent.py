"""The QEMU guest agent: commands that reach the guest without its network."""

from __future__ import annotations

import base64
import json
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
