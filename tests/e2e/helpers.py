"""Checks shared by the end-to-end tests: installed images, libvirt objects, work dirs."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from pytest_ostimages.config import default_workdir
from pytest_ostimages.waiting import poll

if TYPE_CHECKING:
    import libvirt

IMAGES = Path(os.environ.get("OST_IMAGES_DIR", "/usr/share/ost-images"))
_ROOT = Path(os.environ.get("OST_WORKDIR") or default_workdir())
# Under pytest-xdist (.ci/run: -n 2) each worker keeps the work roots of its sessions in an area of its
# own (its default work root, which its sessions inherit as OST_WORKDIR, and the scratch roots), so that
# the before/after checks of one worker's tests do not count another worker's VMs (libvirt_objects).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
AREAS = f"{_ROOT}-e2e-"  # every worker's area starts so
AREA: Optional[Path] = Path(f"{AREAS}{WORKER}") if WORKER else None
WORKDIR = AREA / "work" if AREA else _ROOT
if AREA:
    AREA.mkdir(mode=0o755, exist_ok=True)  # traversable by qemu's user, as /var/tmp
    os.environ["OST_WORKDIR"] = str(WORKDIR)
# The inner sessions are no workers of this run (test code in them reads PYTEST_XDIST_WORKER)
for _name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
    os.environ.pop(_name, None)
LIBVIRT_URI = os.environ.get("OST_LIBVIRT_URI", "qemu:///system")
# The project's test images (images/build-test-images), whatever else is installed beside them:
# BIOS, ifupdown and eth0, layers as overlays on base
DISTRO = "debian12"
# options of the inner sessions run by pytester: they do not read our pytest.ini
INNER = ["-p", "no:cacheprovider", "--ost-memory=512", "--ost-vcpus=2", "--ost-warm=off", f"--ost-distro={DISTRO}"]
# Sessions that need VMs but do not test booting them: restored from the states earlier sessions of
# the run (or of an earlier run) saved, booted and saved when there are none. They pass either way.
# (One cache for all xdist workers: a state is saved under a host-wide lock.)
RESTORABLE = ["--ost-warm=on", f"--ost-warm-dir={_ROOT.parent / 'pytest-ostimages-e2e-warm'}"]
LOCKS = Path("/var/lock/pytest-ostimages-e2e")  # the e2e tests of every run on this host take turns here


@contextlib.contextmanager
def ost_example_pool() -> Iterator[str]:
    """The subnet pool option of the example OST suite's sessions (examples/ost_suite: test_warm_environments,
    test_remote), which share its saved states, held by one test at a time (another xdist worker's waits): so
    each of its sessions gets the subnets they were saved on, whichever saved them, and restores the VMs
    with their NICs kept (2-3 s a VM) instead of moving every NIC (15-20 s a VM under load)."""
    LOCKS.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(LOCKS / "ost-example-pool", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield "--ost-subnet-pool=192.168.240.0/21"  # closing the file releases the lock


def free_subnet(conn: "libvirt.virConnect") -> ipaddress.IPv4Network:
    """A /24 that no libvirt network and no route of this host uses (for a test's own network)."""
    from pytest_ostimages.hypervisor.subnets import free_subnet as first_free, host_networks, network_subnets

    subnet = first_free(ipaddress.IPv4Network("10.250.0.0/16"), network_subnets(conn) + host_networks())
    assert subnet is not None, "no free /24 in 10.250.0.0/16 for a test network"
    return subnet


def image_state() -> dict[str, tuple[str, int, int, int]]:
    """sha256, owner, group and mode of every installed qcow2."""
    state = {}
    for path in sorted(IMAGES.glob("*.qcow2")):
        st = path.stat()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        state[path.name] = (digest.hexdigest(), st.st_uid, st.st_gid, st.st_mode)
    return state


def libvirt_objects(pid: Optional[int] = None) -> set[str]:
    """Libvirt domains and networks labelled by the plugin (by process `pid` if given)."""
    import libvirt

    from pytest_ostimages.state.owner import Label

    conn = libvirt.open(LIBVIRT_URI)
    try:
        objects = [("domain", d) for d in conn.listAllDomains()] + \
                  [("network", n) for n in conn.listAllNetworks()]
        labelled = []
        for kind, obj in objects:
            try:
                labelled.append((kind, obj.name(), Label.from_xml(obj.XMLDesc())))
            except libvirt.libvirtError:  # removed meanwhile (by another xdist worker's session)
                continue
        return {f"{kind} {name}" for kind, name, label in labelled
                if label is not None and pid in (None, label.pid) and not another_workers(label.workdir)}
    finally:
        conn.close()


def another_workers(workdir: str) -> bool:
    """Whether a work directory is in the area of another xdist worker."""
    return AREA is not None and workdir.startswith(AREAS) and not workdir.startswith(f"{AREA}/")


def workdirs() -> set[str]:
    """Session work directories (they carry an owner label; the layer cache does not)."""
    return {p.parent.name for p in WORKDIR.glob("*/owner.json")}


# pid 1 of a PidNamespace: it reaps the orphans of the sessions killed in there (a zombie would pass
# for a live process), SIGCHLD blocked so that none is missed between two waits
_INIT = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        signal.sigtimedwait({signal.SIGCHLD}, 1)
"""


@dataclass(frozen=True)
class PidNamespace:
    """A pid namespace of a test's own, with its own /proc, as a container has one.

    A session judges the objects of a session in another pid namespace alive, whatever became of
    it (it cannot see that process): so the leftovers of a session killed in here are reaped by the
    next session in here only, never by another xdist worker's sessions, and a test that kills
    sessions need not run alone. The sessions it kills and the ones that must reap after them
    (and the bystanders whose liveness counts) all run in the same one: `command`.
    """

    init: int  # its pid 1, as this process sees it

    def command(self, argv: list[str], cwd: "os.PathLike[str] | str") -> list[str]:
        """`argv` run in this namespace (and its mount namespace: its /proc), in folder `cwd`."""
        return ["nsenter", f"--target={self.init}", "--pid", "--mount", f"--wd={cwd}", "--", *argv]

    def pytest(self, cwd: "os.PathLike[str] | str", *args: str) -> list[str]:
        return self.command([sys.executable, "-m", "pytest", *args], cwd)

    @staticmethod
    def kill(proc: "subprocess.Popen[str]") -> None:
        """SIGKILL what `proc`, an nsenter of `command`, runs (nsenter itself cannot pass SIGKILL on;
        it exits as its command did)."""
        child = _child(proc.pid)
        assert child is not None, "nsenter has not started its command"
        os.kill(child, signal.SIGKILL)


def _child(pid: int) -> Optional[int]:
    """The first child of process `pid` (None: none yet)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else None


@contextlib.contextmanager
def pid_namespace() -> Iterator[PidNamespace]:
    """A PidNamespace for the block; everything still running in it is killed after (needs root)."""
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "slave",
                                "--kill-child", sys.executable, "-c", _INIT], stdin=subprocess.DEVNULL)

    def started() -> Optional[int]:
        """unshare's child (pid 1 in there), once it runs _INIT: it mounts /proc in there first."""
        assert unshare.poll() is None, f"unshare exited with {unshare.returncode}"
        child = _child(unshare.pid)
        if child is None or Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != os.fsencode(sys.executable):
            return None
        return child

    init = None
    try:
        init = poll(started, 10, 0.05, retry_on=(OSError,))
        assert init is not None, "the pid namespace's init did not start within 10 s"
        yield PidNamespace(init)
    finally:
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)  # and with it everything in the namespace
        unshare.kill()
        unshare.wait(timeout=60)


@contextlib.contextmanager
def scratch_root(prefix: str, pidns: Optional[PidNamespace] = None) -> Iterator[Path]:
    """A work directory root of a test's own under /var/tmp (where qemu's user reaches; under xdist in
    the worker's area), removed after, with what its runs left running (a test that failed half-way
    may leave kept VMs there: without their work root they would be any later session's leftovers).
    Its sessions run in `pidns`: so does the clean-up (to it, theirs are a live container's)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=AREA or "/var/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        cleanup = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", "/dev/null", "--rootdir=/",
                   f"--ost-workdir={root}", "--ost-cleanup"]
        subprocess.run(pidns.command(cleanup, "/") if pidns else cleanup, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=300)
        shutil.rmtree(root, ignore_errors=True)


def inactive_domains(conn: "libvirt.virConnect") -> list[str]:
    """The names of the defined domains that do not run, in one call: listDefinedDomains() counts them
    first and then lists at most that many, so a domain another session defines in between pushes one
    of them out of its answer."""
    import libvirt

    return [dom.name() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)]


@contextlib.contextmanager
def users_own_objects() -> Iterator[str]:
    """A defined (persistent) domain and a running network of the user's, both of the name
    yielded, without a label of ours: what nothing we run may touch."""
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    name = f"users-{secrets.token_hex(3)}"
    subnet = free_subnet(conn)
    net = conn.networkDefineXML(f"<network><name>{name}</name><bridge name='{name[:15]}'/>"
                                f"<ip address='{subnet.network_address + 1}' prefix='24'/></network>")
    net.create()
    dom = conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
                         f"<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
    try:
        yield name
    finally:
        dom.undefine()
        net.destroy()
        net.undefine()
        conn.close()


@contextlib.contextmanager
def users_network(subnet: ipaddress.IPv4Network) -> Iterator[str]:
    """A running network of the user's (no label of ours) on `subnet`, for the block."""
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    name = f"users-{secrets.token_hex(3)}"
    net = conn.networkCreateXML(f"<network><name>{name}</name><bridge name='{name[:15]}'/>"
                                f"<ip address='{subnet.network_address + 1}' prefix='{subnet.prefixlen}'/></network>")
    try:
        yield name
    finally:
        net.destroy()
        conn.close()


def read_until(proc: "subprocess.Popen[str]", marker: str, forbidden: Optional[str] = None) -> str:
    """The output of `proc` up to the line with `marker`; fails if it ends first or says `forbidden`."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        assert forbidden is None or forbidden not in line, "".join(seen)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"never said {marker!r}:\n" + "".join(seen))
