""".ci/lab never destroys what it did not start: a libvirtd that runs already, its VMs and networks.

The daemon these tests run under is, for a `.ci/lab run` of another namespace, exactly
that: a libvirtd started outside its namespace, which it did not start.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import LIBVIRT_URI, inactive_domains, users_own_objects

# Every test here runs alone (EXCLUSIVE in conftest.py): .ci/lab's down runs --ost-cleanup.
LAB = Path(__file__).resolve().parents[2] / ".ci" / "lab"


@pytest.fixture
def users_own() -> Iterator[tuple[str, str]]:
    """A defined (persistent) domain and a running network of the user's: no label of ours."""
    with users_own_objects() as name:
        yield name, name


def daemon() -> str:
    return subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout.split()[0]


def state(name: str) -> tuple[bool, bool, bool]:
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    try:
        return (name in inactive_domains(conn), name in [n.name() for n in conn.listAllNetworks()],
                conn.networkLookupByName(name).isActive() == 1)
    finally:
        conn.close()


def namespaces() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.splitlines() if line.strip()}


@pytest.mark.skipif(os.getuid() != 0, reason=".ci/lab runs as root")
def test_lab_run_leaves_a_libvirtd_it_did_not_start_as_it_was(users_own: tuple[str, str]) -> None:
    name, _ = users_own
    before = daemon(), state(name), namespaces()
    ns = f"labtest-{secrets.token_hex(3)}"
    done = subprocess.run([str(LAB), "run", ns, "--", "true"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "already runs on this host, and .ci/lab did not start it" in done.stderr
    assert "run the command directly" in done.stderr
    assert (daemon(), state(name), namespaces()) == before  # the same daemon, domain, network; no namespace
    # and taking down a lab it never brought up changes nothing either
    down = subprocess.run([str(LAB), "down", ns], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert down.returncode == 0 and "nothing to take down" in down.stdout
    assert (daemon(), state(name), namespaces()) == before
