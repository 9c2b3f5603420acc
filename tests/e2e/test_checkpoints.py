"""Checkpoint fixtures on one VM: run once and saved, then skipped with their effects present,
built on each other (only the deepest restored); a value that cannot be rebuilt, a damaged
state (saved anew) or a changed source runs the fixture."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import INNER, libvirt_objects, scratch_root, workdirs

CONFTEST = """
    from pytest_ostimages import checkpoint, vm_fixture

    box = vm_fixture("box", "engine-installed")


    @checkpoint(files=["data.txt"])
    def configured(box):
        box.put("data.txt", "/etc/configured")
        box.ssh("echo ran >>/root/configured-runs", check=True)
        return {"vm": box, "answer": 42}


    @checkpoint
    def deeper(configured):  # builds on the one above
        configured["vm"].ssh("echo deeper >/root/deeper", check=True)
        return [configured["vm"], "and data"]


    @checkpoint
    def odd(box):
        return object()  # cannot be rebuilt from a saved state
"""

TESTS = """
    def test_configured_and_deeper(configured, deeper):
        vm = configured["vm"]
        assert configured["answer"] == 42 and deeper == [vm, "and data"]
        assert vm.ssh("cat /etc/configured").stdout == open("data.txt").read()
        assert vm.ssh("cat /root/deeper").stdout == "deeper\\n"
        print("RUNS", vm.ssh("cat /root/configured-runs").stdout.count("ran"))


    def test_odd(odd):
        assert odd is not None
"""


@pytest.fixture
def warm_root() -> Iterator[Path]:
    """A work root (and so a warm cache) of its own: nothing saved before this test."""
    with scratch_root("ost-checkpoints-") as root:
        yield root


def keys(output: str, what: str) -> list[str]:
    return re.findall(rf"{what} (\w+)", output)


def test_checkpoints_are_restored_with_their_effects(pytester: pytest.Pytester, warm_root: Path) -> None:
    before = libvirt_objects(), workdirs()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    (pytester.path / "data.txt").write_text("setting = 1\n")
    args = [*INNER, "-s", "--ost-warm=on", f"--ost-workdir={warm_root}"]

    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*checkpoint configured: ran in *", "*environment of 1 VMs saved as *",
                                "*checkpoint deeper: ran in *", "*environment of 1 VMs saved as *", "*RUNS 1*"])
    first.stdout.fnmatch_lines(["*checkpoint odd: not saved: its value cannot be rebuilt from a saved state "
                                "(a object)*"])
    configured, deeper = keys(first.stdout.str(), "environment of 1 VMs saved as")

    # both skipped, and nothing booted: the VMs start in the deeper one's state, with its effects and
    # those of the one below it, restored once
    second = pytester.runpytest_subprocess(*args)
    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines([f"*checkpoint deeper: the session's VMs start in its saved state {deeper}: "
                                 f"nothing booted*",
                                 f"*checkpoint configured: saved state {configured} found: its body does not run*",
                                 f"*checkpoint deeper: saved state {deeper} found: its body does not run*",
                                 "*RUNS 1*"])  # from the one run of the first session
    assert ": booting " not in second.stdout.str() and "VMs restored from" not in second.stdout.str()
    assert "checkpoint odd: ran in" in second.stdout.str()  # never saved: it runs every time
    assert "saving its ready state" not in second.stdout.str()  # restored: no longer as booted

    # a damaged state: its fixture runs again (on the state before it), and it is saved anew
    next((warm_root / "warm" / deeper).glob("*/memory.save")).unlink()
    third = pytester.runpytest_subprocess(*args)
    third.assert_outcomes(passed=2)
    third.stdout.fnmatch_lines([f"*the session's VMs start in its saved state {configured}: nothing booted*",
                                f"*checkpoint configured: saved state {configured} found*",
                                f"*checkpoint deeper: its saved state {deeper} cannot be used (saved environment "
                                f"{deeper} is damaged or gone (VMs ?'box'?: box: *memory.save is missing); removed, "
                                f"to be saved again): running it*",
                                "*checkpoint deeper: ran in *", f"*environment of 1 VMs saved as {deeper} in *",
                                "*RUNS 1*"])

    # a changed source: that checkpoint runs again, on the one below it, and is saved under a new key
    pytester.makeconftest(CONFTEST.replace("echo deeper >", "echo deeper >/dev/null; echo deeper >"))
    fourth = pytester.runpytest_subprocess(*args)
    fourth.assert_outcomes(passed=2)
    fourth.stdout.fnmatch_lines([f"*the session's VMs start in its saved state {configured}: nothing booted*",
                                 "*checkpoint deeper: ran in *", "*RUNS 1*"])
    changed = keys(fourth.stdout.str(), "environment of 1 VMs saved as")[0]
    assert changed not in (configured, deeper)

    listing = pytester.runpytest_subprocess(f"--ost-workdir={warm_root}", "--ost-warm-list").stdout
    for line in (f"{configured} * MiB * h old  configured (box)  ?fixture: *conftest.py:* configured; "
                 "files: ?'data.txt'??  on *",
                 f"{deeper} * MiB * h old  deeper (box)  ?fixture: *conftest.py:* deeper?  on {configured}",
                 f"{changed} * MiB * h old  deeper (box)  ?fixture: *conftest.py:* deeper?  on {configured}"):
        listing.fnmatch_lines([line])  # in the order of their last use
    assert (libvirt_objects(), workdirs()) == before
