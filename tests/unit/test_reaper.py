"""The reaper removes what dead runs left, and nothing else (libvirt's test driver)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from pytest_ostimages.hypervisor import connection as virt
from pytest_ostimages.state import ledger as reaper
from pytest_ostimages.state.owner import Label
from pytest_ostimages.hypervisor.render import Templates, domain_xml, network_xml


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def define(conn, label: Label | None, name: str, octet: int) -> None:
    tmpl = Templates()
    subnet = ipaddress.IPv4Network(f"192.168.{octet}.0/24")
    some = label or Label("none", 1, "h", "/w")
    net_xml = network_xml(tmpl.load("network.xml"), name=f"{name}-net", bridge=f"{name}-net",
                          subnet=subnet, domain="ost.test", hosts=[], label=some)
    dom_xml = domain_xml(tmpl.load("domain.xml"), name=f"{name}-vm", virt_type="test",
                         cpu_mode="default", memory_mib=128, vcpus=1, disk=Path("/w/d.qcow2"),
                         backing=[], nics=[(f"{name}-net", "52:54:00:00:00:01")],
                         console_log=Path("/w/c.log"), label=some)
    if label is None:  # a foreign object: same XML without our metadata
        net_xml = net_xml.replace(net_xml[net_xml.index("<metadata>"):net_xml.index("</metadata>") + 11], "")
        dom_xml = dom_xml.replace(dom_xml[dom_xml.index("<metadata>"):dom_xml.index("</metadata>") + 11], "")
    virt.create_network(conn, net_xml)
    virt.create_domain(conn, dom_xml)


def names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains()} | {n.name() for n in conn.listAllNetworks()}


def test_only_dead_owners_are_reaped(conn, tmp_path: Path) -> None:
    alive = Label.current("a11fe000", tmp_path / "a11fe000")
    dead = Label("dead0001", dead_pid(), alive.host, str(tmp_path / "dead0001"))
    # the owner's pid was reused by another process: its start time differs
    reused = Label("2e05ed00", os.getpid(), alive.host, str(tmp_path / "2e05ed00"),
                   boot=alive.boot, pidns=alive.pidns, since_boot=alive.since_boot - 1)
    elsewhere = Label("2e307e00", dead_pid(), "another-host", str(tmp_path / "2e307e00"))
    define(conn, alive, "alive", 201)
    define(conn, dead, "dead", 202)
    define(conn, reused, "reused", 203)
    define(conn, elsewhere, "remote", 204)
    define(conn, None, "foreign", 205)
    for label in (alive, dead, reused, elsewhere):
        Path(label.workdir).mkdir()
        label.write(Path(label.workdir))
    (tmp_path / "unlabelled").mkdir()

    removed = reaper.reap(conn, tmp_path)

    assert sorted(str(r) .split(" (")[0] for r in removed) == sorted([
        "domain dead-vm", "network dead-net", "domain reused-vm", "network reused-net",
        f"workdir {tmp_path}/dead0001", f"workdir {tmp_path}/2e05ed00"])
    assert [r.kind for r in removed[:2]] == ["domain", "domain"]  # domains before networks
    left = names(conn)
    for kept in ("alive", "remote", "foreign"):
        assert {f"{kept}-vm", f"{kept}-net"} <= left
    assert {p.name for p in tmp_path.iterdir()} == {"a11fe000", "2e307e00", "unlabelled"}


def test_cleanup_option_reports_and_exits(pytester: pytest.Pytester, tmp_path: Path) -> None:
    dead = Label("dead0001", dead_pid(), Label.current("x", tmp_path).host, str(tmp_path / "w" / "dead0001"))
    Path(dead.workdir).mkdir(parents=True)
    dead.write(Path(dead.workdir))
    pytester.makepyfile("def test_not_run():\n    raise AssertionError\n")
    result = pytester.runpytest("--ost-cleanup", "--ost-libvirt-uri=test:///default",
                                f"--ost-workdir={tmp_path / 'w'}")
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"removed workdir {tmp_path}/w/dead0001 (run dead0001, pid * gone)",
                                 "pytest-ostimages: removed 1 leftovers at test:///default*"])
    assert not Path(dead.workdir).exists()


@pytest.mark.skipif(os.getuid() != 0, reason="makes files of another user (needs root)")
def test_another_users_runs_are_never_reaped(conn, tmp_path: Path) -> None:
    # another user's work root: a run kept for --ost-reuse (its owner ended long ago) and a run
    # whose record cannot be read; both owners' pids are gone, as they are for a kept run
    from pytest_ostimages.state import kept
    from pytest_ostimages.state.environment import Environment
    from pytest_ostimages.state.owner import RunRecord

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    host = Label.current("x", tmp_path).host
    kept_label = Label("4e910001", dead_pid(), host, str(theirs / "4e910001"))
    hidden = Label("4e910002", dead_pid(), host, str(theirs / "4e910002"))
    define(conn, kept_label, "kept", 211)
    define(conn, hidden, "hidden", 212)
    for label in (kept_label, hidden):
        Path(label.workdir).mkdir()
    RunRecord(kept_label, kept=True).write(Path(kept_label.workdir))
    kept.write(theirs, "fingerprint", Environment(kept_label.run_id, kept_label, Path(kept_label.workdir), (), ()))
    (Path(hidden.workdir) / "owner.json").write_text("{}")  # not a record this user can make sense of
    for path in [theirs, *theirs.rglob("*")]:
        os.chown(path, 12345, 12345)
    (Path(hidden.workdir) / "owner.json").chmod(0o600)

    assert reaper.reap(conn, tmp_path) == []
    assert {"kept-vm", "kept-net", "hidden-vm", "hidden-net"} <= names(conn)
