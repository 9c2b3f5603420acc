"""--ost-reuse: the next run attaches instead of booting, unless something changed."""

from __future__ import annotations

import pytest

from .helpers import INNER


def boot_id(result: pytest.RunResult) -> str:
    [line] = [line for line in result.outlines if line.startswith("BOOT_ID ")]
    return line.split()[1]


def test_reuse_skips_the_boot_until_something_changes(pytester: pytest.Pytester, unchanged: None) -> None:
    pytester.makepyfile("""
        def test_vm(ost_vm):
            print("BOOT_ID", ost_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip())
    """)
    args = ["--ost-image=base", "-s", *INNER]

    first = pytester.runpytest_subprocess("--ost-reuse", *args)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*vm: booting debian12-base*", "*keeping 1 VMs for the next run*"])

    second = pytester.runpytest_subprocess("--ost-reuse", *args)
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["*reusing the VMs kept by an earlier run*"])
    second.stdout.no_fnmatch_line("*booting*")
    assert boot_id(second) == boot_id(first)  # the same running guest

    changed = pytester.runpytest_subprocess("--ost-reuse", *args, "--ost-memory=640")
    changed.assert_outcomes(passed=1)
    changed.stdout.fnmatch_lines(["*the kept VMs do not match this session*removing them*",
                                  "*vm: booting debian12-base*640 MiB*"])
    assert boot_id(changed) != boot_id(first)

    cleanup = pytester.runpytest_subprocess("--ost-cleanup")
    cleanup.stdout.fnmatch_lines(["removed domain ost-*-vm *", "removed network ost-* *"])
