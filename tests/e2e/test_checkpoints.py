"""Checkpoint fixtures on one VM: run once and saved, then skipped with their effects present,
built on each other; a value that cannot be rebuilt, or a damaged state, runs the fixture."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import INNER, libvirt_objects, workdirs

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
    root = Path(tempfile.mkdtemp(prefix="ost-checkpoints-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def keys(output: str, name: str) -> list[str]:
    return re.findall(rf"checkpoint {name}: restored from saved state (\w+)", output)


def test_checkpoints_are_restored_with_their_effects(pytester: pytest.Pytester, warm_root: Path) -> None:
    before = libvirt_objects(), workdirs()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    (pytester.path / "data.txt").write_text("setting = 1\n")
    args = [*INNER, "-s", "--ost-warm=on", f"--ost-workdir={warm_root}"]

    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*checkpoint configured: ran in *", "*environment of 1 VMs saved as *",
                                "*checkpoint deeper: ran in *", "*RUNS 1*"])
    first.stdout.fnmatch_lines(["*checkpoint odd: not saved: its value cannot be rebuilt from a saved state "
                                "(a object)*"])

    second = pytester.runpytest_subprocess(*args)
    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines(["*checkpoint configured: restored from saved state *; its body did not run*",
                                 "*checkpoint deeper: restored from saved state *; its body did not run*",
                                 "*RUNS 1*"])  # its effects, from the one run of the first session
    assert "checkpoint odd: ran in" in second.stdout.str()  # never saved: it runs every time

    # a damaged state: the fixture runs again (on the restored state before it), and says why
    deeper_state = warm_root / "warm" / keys(second.stdout.str(), "deeper")[0]
    next(deeper_state.glob("*/memory.save")).unlink()
    damaged = pytester.runpytest_subprocess(*args)
    damaged.assert_outcomes(passed=2)
    damaged.stdout.fnmatch_lines(["*checkpoint configured: restored from saved state *",
                                  "*checkpoint deeper: its saved state * cannot be used (saved environment * is "
                                  "damaged or gone*): running it*", "*checkpoint deeper: ran in *"])
    assert (libvirt_objects(), workdirs()) == before
