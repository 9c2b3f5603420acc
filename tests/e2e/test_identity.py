"""Every VM its own identity, its host key pinned (--ost-identity=auto, the default)."""

from __future__ import annotations

import re
import subprocess

import pytest

from pytest_ostimages import VM, Lab, VMError
from pytest_ostimages.guest.keys import fingerprint

GUEST_KEY = "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"


def test_clones_of_one_layer_each_have_their_own(host0: VM, host1: VM, host2: VM) -> None:
    vms = [host0, host1, host2]
    machine_ids = {vm.ssh("cat /etc/machine-id", check=True).stdout.strip() for vm in vms}
    host_keys = {vm.ssh(GUEST_KEY, check=True).stdout.split()[1] for vm in vms}
    names = [vm.ssh("hostname && hostname -f", check=True).stdout.split() for vm in vms]
    assert len(machine_ids) == 3, machine_ids
    assert len(host_keys) == 3, host_keys
    assert names == [[vm.role, vm.hostname] for vm in vms]
    for vm in vms:  # the key the plugin pinned is the one the guest has
        assert vm.host_key is not None
        assert fingerprint(vm.host_key) == vm.ssh(GUEST_KEY, check=True).stdout.split()[1]


def test_openssh_logs_in_with_the_written_config(engine: VM, ost_lab: Lab) -> None:
    config = ost_lab.workdir.path / "ssh_config"
    for name in ("engine", engine.hostname):
        done = subprocess.run(["ssh", "-F", str(config), name, "hostname"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "engine"


def test_a_host_key_changed_behind_the_plugins_back_is_refused(clean_vm: VM) -> None:
    pinned = fingerprint(clean_vm.host_key)
    clean_vm.ssh("rm /etc/ssh/ssh_host_* && ssh-keygen -q -A && systemctl restart ssh", check=True)
    clean_vm.close()  # the next command connects anew
    with pytest.raises(VMError, match=rf"VM clean .* offered host key SHA256:\S+ \(ssh-ed25519\), but "
                                      rf"{re.escape(pinned)} \(ssh-ed25519\) was pinned"):
        clean_vm.ssh("true")
