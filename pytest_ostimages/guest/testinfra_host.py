"""testinfra for a VM (``vm.testinfra``), over the VM's own pinned SSH connection.

testinfra's paramiko backend accepts any host key and reads ``~/.ssh/config``;
this one logs in as the plugin does (the session key, the pinned host key) and
shares the VM's connection, which reconnects after a revert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import OstError

if TYPE_CHECKING:
    import paramiko
    import testinfra.host

    from .ssh import SSH


def host(ssh: "SSH") -> "testinfra.host.Host":
    try:
        from testinfra.backend.paramiko import ParamikoBackend
        from testinfra.host import Host
    except ImportError:
        raise OstError("vm.testinfra needs pytest-testinfra: pip install 'pytest-ostimages[testinfra]'.") from None

    class PinnedParamiko(ParamikoBackend):  # type: ignore[misc]
        @property  # type: ignore[override]
        def client(self) -> "paramiko.SSHClient":
            return ssh.connect()

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(f"paramiko://{ssh.user}@{ssh.host}", **kwargs)

    return Host(PinnedParamiko())
