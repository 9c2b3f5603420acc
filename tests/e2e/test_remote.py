"""Sessions on a remote hypervisor over qemu+ssh://, from a client that holds nothing of it.

The rig (remote.py): the hypervisor is the lab's namespace with sshds of their own (two
addresses stand for two hypervisors), the client another namespace whose only route is to
them, in a mount namespace where the images, the RPM database, the work root and the
warm cache are empty. Saved states are the run's (RESTORABLE, on the hypervisor): what
booting costs is not what these tests check.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import DISTRO, RESTORABLE, WORKDIR, libvirt_objects, ost_example_pool, read_until
from .remote import RemoteHypervisor, remote_hypervisor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WARM = RESTORABLE[1].split("=", 1)[1]  # on the hypervisor: the client must not see it
OWN_WARM = "/var/tmp/ost-remote-warm"  # warm caches of a test's own, hidden from the client too
SMALL = ["-p", "no:cacheprovider", "--ost-memory=512", "--ost-vcpus=2", f"--ost-distro={DISTRO}", *RESTORABLE]

TESTS = """
    import os, subprocess
    from pathlib import Path

    from pytest_ostimages.waiting import poll

    def test_vm_through_the_hypervisor(ost_vm, ost_lab, tmp_path):
        # this machine has none of the hypervisor's files: images, RPM database, work root
        assert not list(Path("/usr/share/ost-images").iterdir())
        assert ost_vm.ssh("cat /etc/ost-layer").stdout.strip() == "engine-installed"
        (tmp_path / "in").write_text("to the guest and back")
        ost_vm.put(tmp_path / "in", "/root/in")
        ost_vm.get("/root/in", tmp_path / "out")
        assert (tmp_path / "out").read_text() == "to the guest and back"
        assert ost_vm.testinfra.file("/etc/ost-layer").content_string.strip() == "engine-installed"
        # the hypervisor's file: what the guest writes to its serial console (a guest restored with its
        # NICs kept may have written nothing there since the restore), there a moment after the guest wrote it
        ost_vm.ssh("echo ost-console-marker >/dev/ttyS0", check=True)
        assert poll(lambda: "ost-console-marker" in ost_vm.console_log(), 30, 0.2), ost_vm.console_log()
        # OpenSSH (and so ansible) through the hypervisor, with the written config
        config = ost_lab.workdir.client / "ssh_config"
        done = subprocess.run(["ssh", "-F", str(config), "vm", "hostname"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "vm", done.stderr
        print("RUN", ost_lab.run_id, ost_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip())

    def test_clean_vm_through_the_hypervisor(clean_vm):
        assert clean_vm.ssh("test -e /root/dirty").returncode == 1
        clean_vm.ssh("touch /root/dirty && sync", check=True)
        clean_vm.revert()
        assert clean_vm.ssh("test -e /root/dirty").returncode == 1
"""


@pytest.fixture(scope="module")
def hv(engine_vm_saved: None) -> Iterator[RemoteHypervisor]:
    """Two hypervisors (two sshd addresses of the lab), for every test of the module (whose sessions restore
    the engine-installed VM where booting it is not the claim)."""
    with remote_hypervisor(count=2, hide=[WARM, OWN_WARM]) as rig:
        yield rig


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    (tmp_path / "test_remote.py").write_text(textwrap.dedent(TESTS))
    return tmp_path


def client(hv: RemoteHypervisor, folder: Path, *args: str, uri: str = "",
           timeout: float = 900) -> subprocess.CompletedProcess:
    """A pytest session as the client, on `uri` (default: the first hypervisor)."""
    return hv.run([sys.executable, "-m", "pytest", "-s", *SMALL, f"--ost-libvirt-uri={uri or hv.uri}", *args],
                  cwd=folder, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    return done.stdout


def leftovers_on_the_hypervisor() -> list[str]:
    """The clients' run directories on the hypervisor (kept.json and the like are not runs)."""
    clients = WORKDIR / "clients"
    return sorted(str(p) for p in clients.glob("*/*") if re.fullmatch(r"[0-9a-f]{8}", p.name)) \
        if clients.is_dir() else []


def test_a_session_runs_its_vms_on_the_hypervisor_and_leaves_nothing(hv: RemoteHypervisor, suite: Path) -> None:
    before = libvirt_objects(), leftovers_on_the_hypervisor()
    output = assert_ok(client(hv, suite, "--ost-image=engine-installed", "--ost-reuse"))
    assert f"on root@{hv.addresses[0]}" in output and "2 passed" in output
    assert "keeping 2 VMs for the next run" in output
    run, boot = re.search(r"^RUN (\w+) (\S+)", output, re.M).groups()  # type: ignore[union-attr]
    # the next session attaches to the kept VMs, on the hypervisor, from the client's kept.json there
    again = assert_ok(client(hv, suite, "--ost-image=engine-installed", "--ost-reuse"))
    assert "reusing the VMs kept by an earlier run" in again and ": booting " not in again
    assert re.search(r"^RUN (\w+) (\S+)", again, re.M).groups() == (run, boot)  # type: ignore[union-attr]
    cleanup = assert_ok(hv.run([sys.executable, "-m", "pytest", "--ost-cleanup", f"--ost-libvirt-uri={hv.uri}"],
                               cwd=suite, timeout=300))
    # its run is removed: its work directory by this cleanup, its domains by it or, once it forgot the kept
    # VMs, by another session's reaper that ran at the same moment (another xdist worker's): both are right
    assert "removed workdir " in cleanup and f"(run {run}, " in cleanup, cleanup
    assert (libvirt_objects(), leftovers_on_the_hypervisor()) == before


def test_warm_start_saves_and_restores_on_the_hypervisor(hv: RemoteHypervisor, suite: Path) -> None:
    # a warm cache of the test's own on the hypervisor: the first session boots and saves there (the
    # save image, the disk: files the client never sees), the next restores (the FIFO fed there)
    warm = Path(OWN_WARM) / suite.name
    args = ["--ost-image=engine-installed", f"--ost-warm-dir={warm}", "-k", "test_vm_through"]
    try:
        first = assert_ok(client(hv, suite, *args))
        assert "vm: booting " in first and "vm: state saved for warm starts" in first, first
        # on the hypervisor (here): the client's own view of that folder is an empty tmpfs
        assert sorted(p.name for p in warm.glob("*/*")) == ["disk.qcow2", "memory.save", "meta.json"]
        second = assert_ok(client(hv, suite, *args))
        assert re.search(r"vm: restored debian12-engine-installed from saved state \w+ as .* in [\d.]+ s \(overlays",
                         second), second
        assert ": booting " not in second
    finally:
        shutil.rmtree(warm, ignore_errors=True)


# runs alone: EXCLUSIVE in conftest.py
def test_a_killed_client_session_is_reaped_by_the_clients_next_one(hv: RemoteHypervisor, tmp_path: Path) -> None:
    (tmp_path / "test_sleep.py").write_text("def test_sleep(ost_vm):\n    print('VM-READY', flush=True)\n"
                                            "    __import__('time').sleep(300)\n")
    (tmp_path / "test_net.py").write_text("def test_net(ost_network):\n    pass\n")
    proc = hv.popen([sys.executable, "-m", "pytest", "-s", *SMALL, f"--ost-libvirt-uri={hv.uri}",
                     "--ost-image=engine-installed", "test_sleep.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        read_until(proc, "VM-READY")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = libvirt_objects(proc.pid)  # labelled with the dead client's pid, on this (its) machine
    assert {o.split()[0] for o in left} == {"domain", "network"}
    run = next(o.split("-")[1] for o in left if o.startswith("domain"))
    assert [p for p in leftovers_on_the_hypervisor() if p.endswith(run)]
    after = assert_ok(client(hv, tmp_path, "test_net.py"))  # its reaper runs first
    for obj in left:
        assert f"removed leftover {obj} (run {run}" in after, after
    assert not libvirt_objects(proc.pid) and not [p for p in leftovers_on_the_hypervisor() if p.endswith(run)]


def test_xdist_workers_are_placed_on_both_hypervisors(hv: RemoteHypervisor, tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import os
        from pathlib import Path

        def pytest_runtest_teardown(item):
            lab = item.config.stash.get(__import__("pytest_ostimages.session").session.LAB_KEY, None)
            if lab is not None:
                Path(f"placed-{os.environ['PYTEST_XDIST_WORKER']}").write_text(lab.config.libvirt_uri)
    """))
    for i in range(4):
        (tmp_path / f"test_{i}.py").write_text(f"def test_{i}(ost_vm):\n    __import__('time').sleep(1)\n"
                                               f"    assert ost_vm.ssh('true').returncode == 0\n")
    both = ",".join(hv.uris)
    output = assert_ok(hv.run([sys.executable, "-m", "pytest", "-n", "2", *SMALL, f"--ost-libvirt-uri={both}",
                               "--ost-image=engine-installed"], cwd=tmp_path, timeout=900, stdin=subprocess.DEVNULL))
    assert "4 passed" in output
    for uri in hv.uris:  # the header: every hypervisor, its libvirt and images
        assert re.search(rf"hypervisor {re.escape(uri)}: libvirt \S+, qemu guests", output), output
    placed = sorted(p.read_text() for p in tmp_path.glob("placed-*"))
    assert placed == sorted(hv.uris), placed  # as much room on each: one worker each, not both on the first


def test_a_subnet_the_hypervisor_uses_is_skipped(hv: RemoteHypervisor, tmp_path: Path) -> None:
    # the hypervisor (this namespace) has an address in the pool's first /24 that the client cannot see
    (tmp_path / "test_net.py").write_text("def test_net(ost_network):\n    print('SUBNET', ost_network.subnet)\n")
    bridge = f"ostbr{os.getpid()}"[:15]  # a bridge of its own (this kernel may lack dummy devices)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.97.4.1/24", "dev", bridge], check=True)
        output = assert_ok(client(hv, tmp_path, "--ost-subnet-pool=10.97.4.0/23", "test_net.py"))
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=True)
    assert "SUBNET 10.97.5.0/24" in output, output


@pytest.mark.parametrize("case", ["unreachable", "refused key", "unknown host key", "no images", "libvirt down"])
def test_a_bad_remote_hypervisor_is_one_clear_error(hv: RemoteHypervisor, tmp_path: Path, case: str) -> None:
    (tmp_path / "test_x.py").write_text("def test_x(ost_vm):\n    pass\n")
    uri, args, home_ssh = hv.uri, ["--ost-image=engine-installed"], hv.home / ".ssh"
    if case == "unreachable":
        uri = uri.replace(hv.addresses[0], str(hv.subnet.network_address + 99))  # nobody there
        said = [f"*{uri.split('?')[0].split('@')[1].rstrip('/system')}*"]
    elif case == "refused key":
        other = tmp_path / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        uri = uri.replace(str(hv.key), str(other))
        said = ["*refused*"]
    elif case == "unknown host key":
        shutil.move(home_ssh / "known_hosts", tmp_path / "known_hosts")
        said = ["*host key*", "*ssh-keyscan*"]
    elif case == "no images":
        args.append("--ost-images-dir=/nonexistent")
        said = [f"*No ost-images are installed*on root@{hv.addresses[0]}*"]
    else:  # its libvirtd's socket is not there: what a hypervisor whose libvirtd is down looks like
        uri = f"{uri}&socket=/nonexistent/libvirt-sock"
        said = ["*Cannot connect to libvirt at*", "*Is the daemon running?*"]
    try:
        done = hv.run([sys.executable, "-m", "pytest", *SMALL, f"--ost-libvirt-uri={uri}", *args], cwd=tmp_path,
                      timeout=120, stdin=subprocess.DEVNULL)
    finally:
        if case == "unknown host key":
            shutil.move(tmp_path / "known_hosts", home_ssh / "known_hosts")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "pytest_ostimages/" not in output, output
    result = pytest.LineMatcher(output.splitlines())
    result.fnmatch_lines(said)


def test_the_example_suite(hv: RemoteHypervisor, tmp_path: Path) -> None:
    # engine + 2 hosts as the README shows them, restored on the hypervisor where test_examples saved them
    before = libvirt_objects()
    output = assert_ok(client(hv, tmp_path, str(EXAMPLES / "basic_suite")))
    assert "7 passed" in output and "3 VMs ready in " in output, output
    assert libvirt_objects() == before


def test_the_ost_example_suite_with_osts_own_ost_utils(hv: RemoteHypervisor, tmp_path: Path) -> None:
    # OST's ansible fixtures reach the VMs through the deployment's hosts file (a ProxyCommand through
    # the hypervisor), its backend reads the domains over the same libvirt URI, testinfra reaches them
    # too and finds what the deploy scripts did, and its checkpoint fixture is saved (or restored) there too
    # (the suite's every test: test_warm_environments.py, which then restores what this session saved)
    suite = tmp_path / "ost_suite"
    shutil.copytree(EXAMPLES / "ost_suite", suite)
    before = libvirt_objects()
    with ost_example_pool() as pool:  # where test_warm_environments' sessions save and restore them too
        output = assert_ok(client(hv, tmp_path, f"--ost-init-config={suite / 'basic-suite' / 'ost.json'}",
                                  f"--ost-root={suite}", pool, str(suite / "basic-suite"), "-k",
                                  "backend_finds or ansible or testinfra or engines_service", timeout=1200))
    assert "5 passed" in output and " failed" not in output, output
    assert re.search(r"checkpoint hosts_enrolled: (ran in|saved state \w+ found)", output), output
    assert libvirt_objects() == before
