"""--ost-reuse: the next run attaches instead of booting, unless something changed;
an attached environment is whole (clean_vm, more VMs); a reusing session that dies
leaves nothing the reaper cannot take.

The first VMs are the run's saved states where there are (RESTORABLE): booting is not the claim
until something changed."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from .helpers import DISTRO, INNER, RESTORABLE, libvirt_objects, pid_namespace, read_until


def boot_id(result: pytest.RunResult) -> str:
    [line] = [line for line in result.outlines if line.startswith("BOOT_ID ")]
    return line.split()[1]


TESTS = """
    import os

    def test_vm(ost_vm):
        print("BOOT_ID", ost_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip())

    def test_clean(clean_vm):
        assert clean_vm.ssh("test -e /root/dirty").returncode == 1
        clean_vm.ssh("touch /root/dirty && sync", check=True)

    def test_more_vms(ost_vm_factory, ost_vm):
        if os.environ.get("OST_E2E_MORE_VMS"):
            late = ost_vm_factory("base", role="late")
            assert late.ip != ost_vm.ip
            assert late.ssh("getent ahostsv4 vm").stdout.split()[0] == str(ost_vm.ip)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="kills a session in a pid namespace of its own (needs root)")
def test_reuse_skips_the_boot_until_something_changes(pytester: pytest.Pytester, unchanged: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(TESTS)
    args = ["--ost-image=base", "-s", *INNER]

    first = pytester.runpytest_subprocess("--ost-reuse", *args, *RESTORABLE)
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines([f"*vm: *{DISTRO}-base*", "*keeping 2 VMs for the next run*"])  # booted or restored

    # attached: the clean snapshot of the first run is reverted to, not taken again,
    # and a VM added now gets the next free address
    monkeypatch.setenv("OST_E2E_MORE_VMS", "1")
    second = pytester.runpytest_subprocess("--ost-reuse", *args, *RESTORABLE)
    second.assert_outcomes(passed=3)
    second.stdout.fnmatch_lines(["*reusing the VMs kept by an earlier run*", f"*late: *{DISTRO}-base*"])
    second.stdout.no_fnmatch_line("*vm: booting*")
    second.stdout.no_fnmatch_line("*vm: restored*")
    assert boot_id(second) == boot_id(first)  # the same running guest
    monkeypatch.delenv("OST_E2E_MORE_VMS")

    changed = pytester.runpytest_subprocess("--ost-reuse", *args, "--ost-memory=640")
    changed.assert_outcomes(passed=3)
    changed.stdout.fnmatch_lines(["*the kept VMs cannot be reused (images, templates or settings changed): "
                                  "removing them*",
                                  f"*vm: booting {DISTRO}-base*640 MiB*"])
    assert boot_id(changed) != boot_id(first)

    # a reusing session killed with SIGKILL: its VMs are the next session's leftovers (both sessions
    # in a pid namespace of their own: to any other session, such as another xdist worker's, they
    # are a live container's)
    pytester.makepyfile(test_sleep="def test_sleep(ost_vm, clean_vm):\n    __import__('time').sleep(120)\n")
    with pid_namespace() as pidns:
        proc = subprocess.Popen(pidns.pytest(pytester.path, "--ost-reuse", "test_sleep.py", *args, "--ost-memory=640"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        seen = read_until(proc, "reusing the VMs kept by an earlier run", forbidden="booting")
        time.sleep(1)
        pidns.kill(proc)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, seen
        left = libvirt_objects()
        assert any(o.startswith("domain") for o in left)
        pytester.makepyfile(test_sleep="def test_net(ost_network):\n    pass\n")
        after = pytester.run(*pidns.pytest(pytester.path, "test_sleep.py", *INNER))
    after.assert_outcomes(passed=1)
    after.stdout.fnmatch_lines(["*removed leftover domain ost-*-vm *", "*removed leftover network ost-*"])
