"""A run stopped half-way: SIGTERM tears down at once, SIGKILL leaves labelled
objects that the next run (or --ost-cleanup) removes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import INNER, LIBVIRT_URI, WORKDIR, free_subnet, libvirt_objects, read_until, scratch_root


def start_booting(pytester: pytest.Pytester) -> subprocess.Popen:
    """An inner session that is booting a VM (its domain exists) when this returns."""
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--ost-image=base", *INNER],
                            cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while not any(o.startswith("domain") for o in libvirt_objects(proc.pid)):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the inner session defined no domain within 60 s"
        time.sleep(0.2)
    return proc


def test_sigterm_while_booting_tears_down(pytester: pytest.Pytester, unchanged: None) -> None:
    proc = start_booting(pytester)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "[ost] removing the VMs, networks and work directory of run" in output


@pytest.fixture
def foreign_networks() -> Iterator[list[str]]:
    """Two networks that are not the reaper's to take: one unlabelled, one whose owner lives."""
    import libvirt

    from pytest_ostimages.state.owner import Label
    from pytest_ostimages.hypervisor.render import Templates, network_xml

    conn = libvirt.open(LIBVIRT_URI)
    names = ["foreign-nolabel", "foreign-alive"]
    for name, label in ((names[0], None), (names[1], Label.current("alive000", Path("/nonexistent")))):
        xml = network_xml(Templates().load("network.xml"), name=name, bridge=name,
                          subnet=free_subnet(conn), domain="x.test", hosts=[],
                          label=label or Label("x", 1, "h", "/"))
        if label is None:
            xml = xml[:xml.index("<metadata>")] + xml[xml.index("</metadata>") + len("</metadata>"):]
        conn.networkCreateXML(xml)
    yield names
    for name in names:
        conn.networkLookupByName(name).destroy()
    conn.close()


# runs alone: EXCLUSIVE in conftest.py
def test_sigkill_leftovers_are_reaped(pytester: pytest.Pytester, unchanged: None,
                                      foreign_networks: list[str]) -> None:
    proc = start_booting(pytester)
    proc.kill()
    proc.wait()
    left = libvirt_objects(proc.pid)
    assert {o.split()[0] for o in left} == {"domain", "network"}
    # the next session removes them before it creates anything
    pytester.makepyfile("def test_net(ost_network):\n    pass\n")
    result = pytester.runpytest_subprocess(*INNER)
    result.assert_outcomes(passed=1)
    assert "foreign" not in result.stdout.str()  # neither was touched
    import libvirt
    conn = libvirt.open(LIBVIRT_URI)
    assert set(foreign_networks) <= {n.name() for n in conn.listAllNetworks()}
    conn.close()
    for obj in left:
        result.stdout.fnmatch_lines([f"*removed leftover {obj} (run *, pid {proc.pid} gone)*"])
    result.stdout.fnmatch_lines(
        [f"*removed leftover workdir {WORKDIR}/* (run *, pid {proc.pid} gone)*"])


def test_sigterm_tears_down_at_once_without_saving_warm_states(pytester: pytest.Pytester, unchanged: None) -> None:
    pytester.makepyfile("def test_x(ost_vm):\n    print('VM-READY', flush=True)\n    __import__('time').sleep(300)\n")
    with scratch_root("ost-sigterm-") as workdir:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-s", "--ost-image=base", *INNER, "--ost-warm=on",
                                 f"--ost-workdir={workdir}"], cwd=pytester.path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen = read_until(proc, "VM-READY")  # the VM is ready, its state would be saved at a normal end
        proc.send_signal(signal.SIGTERM)
        output = seen + proc.communicate(timeout=120)[0]
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
        assert "[ost] removing the VMs, networks and work directory of run" in output
        assert "saving its ready state" not in output and "state saved for warm starts" not in output, output
        assert not (workdir / "warm").exists() or list((workdir / "warm").iterdir()) == []
