"""Nothing foreign destroyed, no other session's VMs reaped, no half-booted VM kept, secrets private.

libvirt's test driver, real files, real processes and real lock files; no VM boots here
(tests/e2e/test_faults.py does the same on real VMs, killing sessions at every step).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from lxml import etree

from pytest_ostimages.config import OstConfig
from pytest_ostimages.guest.keys import HostKey
from pytest_ostimages.guest.seed import write_seed
from pytest_ostimages.hypervisor import connection as virt
from pytest_ostimages.hypervisor.render import Templates, network_xml
from pytest_ostimages.lab import reuse
from pytest_ostimages.lab.inputs import VMSpec
from pytest_ostimages.lab.lab import Lab
from pytest_ostimages.state import kept, ledger
from pytest_ostimages.state.environment import Environment
from pytest_ostimages.state.owner import Label, RunRecord
from pytest_ostimages.state.share import Share
from pytest_ostimages.state.warmcache import WarmCache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def roots() -> Iterator[tuple[Path, Path]]:
    """Two work roots, as two sessions with different --ost-workdir have."""
    top = Path(tempfile.mkdtemp(prefix="ost-safety-", dir="/var/tmp"))
    top.chmod(0o755)
    (top / "a").mkdir()
    (top / "b").mkdir()
    yield top / "a", top / "b"
    shutil.rmtree(top)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def labelled_network(conn, name: str, label: Label, octet: int) -> None:
    xml = network_xml(Templates().load("network.xml"), name=name, bridge=name,
                      subnet=ipaddress.IPv4Network(f"192.168.{octet}.0/24"), domain="x.test", hosts=[], label=label)
    virt.create_network(conn, xml)


def network_names(conn) -> set[str]:
    return {n.name() for n in conn.listAllNetworks()}


def a_run(root: Path, run_id: str, pid: int) -> Label:
    """A run's work directory under `root`, labelled with owner `pid`."""
    folder = root / run_id
    folder.mkdir()
    label = Label.current(run_id, folder, pid)
    label.write(folder)
    return label


# --- 2: ownership across work roots ------------------------------------------------------


def test_a_run_adopted_under_another_work_root_is_not_reaped(roots, conn) -> None:
    mine, other = roots
    # booted by a session that is gone, then adopted (--ost-reuse) by a live one under the other root
    booted = a_run(other, "0adc0de1", dead_pid())
    labelled_network(conn, "ost-0adc0de1", booted, 201)
    Label.current("0adc0de1", Path(booted.workdir)).write(Path(booted.workdir))
    # a dead run of the other root, not adopted: a leftover wherever it is found
    dead = a_run(other, "dead0003", dead_pid())
    labelled_network(conn, "ost-dead0003", dead, 202)
    try:
        removed = {str(r).split(" (")[0] for r in ledger.reap(conn, mine)}
        assert removed == {"network ost-dead0003"}
        assert "ost-0adc0de1" in network_names(conn) and (other / "0adc0de1").is_dir()
    finally:
        ledger.remove(conn, ledger.Owned("network", "ost-0adc0de1", booted))


def test_a_run_kept_under_another_work_root_is_not_reaped(roots, conn) -> None:
    mine, other = roots
    label = a_run(other, "0bee0001", dead_pid())  # its session kept it and ended
    labelled_network(conn, "ost-0bee0001", label, 203)
    RunRecord(label, kept=True).write(Path(label.workdir))
    (other / kept.KEPT_FILE).write_text(json.dumps({"fingerprint": "f", "environment": json.dumps(
        {"run_id": "0bee0001"})}))
    try:
        assert ledger.reap(conn, mine) == []
        assert "ost-0bee0001" in network_names(conn)
        kept.forget(other)  # no longer kept (--ost-cleanup): the reaper's now, from any root
        assert [str(r).split(" (")[0] for r in ledger.reap(conn, mine)] == ["network ost-0bee0001"]
    finally:
        if "ost-0bee0001" in network_names(conn):
            ledger.remove(conn, ledger.Owned("network", "ost-0bee0001", label))


def test_a_record_saying_kept_without_kept_json_is_a_leftover(roots, conn) -> None:
    mine, _ = roots
    label = a_run(mine, "0bee0002", dead_pid())  # a keep that crashed before kept.json was written
    RunRecord(label, kept=True).write(Path(label.workdir))
    assert [r.kind for r in ledger.reap(conn, mine)] == ["workdir"]


# --- 4: attach vs reap ---------------------------------------------------------------------


def test_attaching_adopts_the_run_before_anyone_can_reap_it(roots, conn, images: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = roots
    config = OstConfig(libvirt_uri="test:///default", workdir=root, images_dir=images,
                       subnet_pool=ipaddress.IPv4Network("127.102.0.0/24"))
    first = Lab(config, owner_pid=dead_pid())  # the session that kept it has ended
    first.ensure_network()
    specs: list[VMSpec] = []
    reuse.keep(first, specs)  # nothing to boot here: the environment is its network
    assert RunRecord.read(first.workdir.path).kept

    # another session's reaper runs right after the attaching session dropped kept.json
    reaped = []
    forget = kept.forget

    def reaper_in_between(where: Path) -> None:
        forget(where)
        reaped.extend(ledger.reap(conn, root))

    monkeypatch.setattr(kept, "forget", reaper_in_between)
    second = Lab(config)
    try:
        assert reuse.attach_kept(second, specs)
        assert reaped == []
        assert second.run_id == first.run_id and second.network is not None
        assert RunRecord.read(second.workdir.path).owner.pid == os.getpid()
    finally:
        second.close()
    assert not (root / first.run_id).exists()


def test_a_kept_environment_that_stopped_is_not_blamed_on_changed_inputs(roots, conn, images: Path) -> None:
    root, _ = roots
    config = OstConfig(libvirt_uri="test:///default", workdir=root, images_dir=images,
                       subnet_pool=ipaddress.IPv4Network("127.105.0.0/24"))
    first = Lab(config, owner_pid=dead_pid())
    first.ensure_network()
    reuse.keep(first, [])
    conn.networkLookupByName(f"ost-{first.run_id}").destroy()  # stopped behind the plugin's back
    said: list[str] = []
    second = Lab(config, progress=said.append)
    try:
        assert not reuse.attach_kept(second, [])
        assert said == [f"the kept VMs cannot be reused (network ost-{first.run_id} is not running any "
                        f"more): removing them"]
    finally:
        second.close()


# --- 3: only whole, ready environments are kept -----------------------------------------------


def test_an_environment_whose_vm_never_became_ready_is_not_kept(roots, images: Path) -> None:
    root, _ = roots
    config = OstConfig(libvirt_uri="test:///default", workdir=root, images_dir=images,
                       subnet_pool=ipaddress.IPv4Network("127.103.0.0/24"), boot_timeout=1, max_boots=0,
                       virt_type="qemu")
    lab = Lab(config)
    with pytest.raises(Exception, match="not reachable over SSH within 1 s"):
        lab.boot([VMSpec("vm", "base")])  # the test driver's VMs never answer
    assert not lab.vms["vm"].ready
    reuse.keep(lab, [VMSpec("vm", "base")])
    assert not (root / kept.KEPT_FILE).exists()
    assert [p for p in root.iterdir() if p.is_dir()] == []  # removed instead


def test_a_kept_vm_without_a_pinned_key_is_not_attached(roots, conn, images: Path) -> None:
    root, _ = roots
    config = OstConfig(libvirt_uri="test:///default", workdir=root, images_dir=images,
                       subnet_pool=ipaddress.IPv4Network("127.104.0.0/24"))
    lab = Lab(config)
    lab.ensure_network()
    env = lab.environment()
    with pytest.raises(Exception, match="has no pinned host key: it never became ready"):
        vm = env.vms  # no VM: make one record without a key
        record = json.loads(env.to_json())
        record["vms"] = [{"name": f"ost-{env.run_id}-vm", "role": "vm", "hostname": "vm.ost.test", "host_key": "",
                          "ip": str(env.networks[0].subnet.network_address + 10),
                          "nics": [{"network": "management", "name": "vm", "mac": "52:54:00:7f:68:0a",
                                    "ip": str(env.networks[0].subnet.network_address + 10), "ip6": None}],
                          "image": str(images / "testos-base.qcow2"),
                          "overlay": str(lab.workdir.path / "o.qcow2"), "console": str(lab.workdir.path / "c.log")}]
        record["networks"][0]["next_host"] = 11
        conn.createXML(f"<domain type='test'><name>ost-{env.run_id}-vm</name><memory>1024</memory>"
                       f"<os><type>hvm</type></os></domain>")
        Lab(config).attach(Environment.from_json(json.dumps(record), root), verify=True)
    assert vm == ()
    lab.close()
    conn.lookupByName(f"ost-{env.run_id}-vm").destroy()


# --- 5: liveness when /proc hides other users' processes ---------------------------------------


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                    reason="needs root, unshare and setpriv to mount a hidepid /proc as another user")
def test_another_users_live_session_is_alive_when_proc_hides_it(tmp_path: Path) -> None:
    python = Path("/usr/bin/python3")
    if not python.exists() or subprocess.run([str(python), "-c", "import sys; print(sys.version_info[:2])"],
                                             capture_output=True, text=True).stdout.strip() != \
            str(tuple(sys.version_info[:2])):
        pytest.skip("needs a system python3 of this version, which an unprivileged user can run")
    session = subprocess.Popen(["sleep", "300"])  # root's live session
    try:
        owner = Label.current("0ddba11a", tmp_path, session.pid)
        code = ("import json, sys; from pytest_ostimages.state.owner import Label\n"
                "print(Label.from_dict(json.loads(sys.argv[1])).owner_alive())")
        site = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
        script = (f"mount -t proc -o hidepid=2 proc /proc && exec setpriv --reuid=65534 --regid=65534 "
                  f"--clear-groups env PYTHONPATH={site}:{ROOT} {python} -c \"$0\" \"$1\"")
        seen = subprocess.run(["unshare", "--mount", "sh", "-c", script, code, json.dumps(owner.to_dict())],
                              capture_output=True, text=True)
        assert (seen.returncode, seen.stdout.strip()) == (0, "True"), seen.stderr
    finally:
        session.kill()
        session.wait()
    assert not owner.owner_alive()  # and once it is gone, it is gone


def test_a_clock_step_does_not_make_a_live_owner_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock moves (NTP, a resumed VM; /proc/stat's btime is whole seconds and flips with
    it): an owner's start time since boot does not, so a live session is never taken for dead."""
    me = Label.current("c10c5732", Path("/w"))
    real = psutil._pslinux.boot_time
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real() + 1.0)
    assert me.owner_alive()
    assert Label.from_xml(f"<domain><metadata>{etree.tostring(me.element()).decode()}</metadata></domain>") == me


def test_a_reused_pid_is_not_the_owner() -> None:
    me = Label.current("0ddba11b", Path("/w"))
    assert me.owner_alive()
    assert not dataclasses.replace(me, since_boot=me.since_boot - 0.05).owner_alive()
    # a label of an earlier version: its start time since the epoch, compared with a second's slack
    assert dataclasses.replace(me, since_boot=0.0, started=me.started + 1).owner_alive()
    assert not dataclasses.replace(me, since_boot=0.0, started=me.started - 5).owner_alive()


# --- 6: the warm cache's one lock protocol ----------------------------------------------------


def saved(cache: WarmCache, key: str) -> None:
    def write(folder: Path) -> dict:
        (folder / "memory.save").write_bytes(b"\0" * 1000)
        (folder / "disk.qcow2").write_bytes(b"\0" * 1000)
        return {"host_key": "ssh-ed25519 AAAA"}
    assert cache.save(key, write, lambda _: None)


def test_a_save_that_fails_leaves_no_partial_state(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm", limit=2**30)

    def write(folder: Path) -> dict:
        (folder / "memory.save").write_bytes(b"\0" * 1000)
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        cache.save("c" * 16, write, lambda _: None)
    assert list((tmp_path / "warm").iterdir()) == []


def test_a_damaged_state_is_removed_unless_in_use(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path / "warm", limit=2**30)
    saved(cache, "a" * 16)
    saved(cache, "b" * 16)
    run = tmp_path / "0bee0004"  # a run's work directory, alive while its owner record is there
    run.mkdir()
    (run / "owner.json").write_text("{}")
    assert cache.use(cache.state("b" * 16), run)
    assert cache.discard(cache.state("a" * 16)) and not cache.state("a" * 16).folder.exists()
    assert not cache.discard(cache.state("b" * 16)) and cache.state("b" * 16).exists()  # its disks back the run's


def test_a_state_backing_a_kept_run_is_never_evicted(roots) -> None:
    root, _ = roots
    cache = WarmCache(root / "warm", limit=0)
    saved(cache, "a" * 16)
    run = a_run(root, "0bee0003", dead_pid())  # its session ended; the run is kept (its directory stays)
    RunRecord(run, kept=True).write(Path(run.workdir))
    assert cache.use(cache.state("a" * 16), Path(run.workdir))
    saved(cache, "b" * 16)  # over the limit: evicts what it can
    assert cache.state("a" * 16).exists()
    shutil.rmtree(run.workdir)  # the kept run is removed
    assert cache.clear() == ["a" * 16, "b" * 16]


def test_clear_never_takes_a_save_in_progress(roots) -> None:
    root, _ = roots
    cache = WarmCache(root / "warm", limit=2**30)
    writing, release = threading.Event(), threading.Event()

    def slow_write(folder: Path) -> dict:
        (folder / "memory.save").write_bytes(b"\0" * 1000)
        writing.set()
        release.wait(10)
        return {"host_key": "ssh-ed25519 AAAA"}

    save = threading.Thread(target=cache.save, args=("c" * 16, slow_write, lambda _: None))
    save.start()
    assert writing.wait(10)
    cleared = []
    clear = threading.Thread(target=lambda: cleared.extend(cache.clear()))
    clear.start()
    clear.join(0.5)
    assert clear.is_alive()  # it waits for the save's lock instead of deleting its folder
    release.set()
    save.join()
    clear.join()
    assert cache.state("c" * 16).exists() or cleared == ["c" * 16]


def test_a_restore_that_finds_no_state_registers_nothing(roots) -> None:
    root, _ = roots
    cache = WarmCache(root / "warm", limit=2**30)
    assert not cache.use(cache.state("d" * 16), root / "0bee0004")


# --- 7: a shared environment of no VMs ------------------------------------------------------


def test_workers_share_an_environment_without_vms(roots, images: Path) -> None:
    root, _ = roots
    config = OstConfig(libvirt_uri="test:///default", workdir=root, images_dir=images,
                       subnet_pool=ipaddress.IPv4Network("127.105.0.0/24"))
    share = Share(root / "share")
    first, second = Lab(config), Lab(config)
    share.join(first, lambda: first.boot([]))
    other = Share(root / "share")
    other.join(second, lambda: second.boot([]))
    assert second.network is not None and second.run_id == first.run_id
    other.leave(second)
    share.leave(first)
    assert [p for p in root.iterdir() if p.is_dir() and p.name != "share"] == []


# --- 9: secrets are private ----------------------------------------------------------------


def test_the_seed_with_the_private_host_key_is_private(tmp_path: Path) -> None:
    pytest.importorskip("pycdlib")
    seed = tmp_path / "vm.seed.iso"
    write_seed(seed, "vm.ost.test", "192.168.1.10", "ssh-rsa AAAA x", HostKey.generate())
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600


def test_a_saved_state_is_for_its_owner_and_qemu_only(roots) -> None:
    root, _ = roots
    cache = WarmCache(root / "warm", limit=2**30, qemu=(64055, os.getgid()))
    saved(cache, "e" * 16)
    state = cache.state("e" * 16)
    assert stat.S_IMODE(state.memory.stat().st_mode) == 0o600  # guest memory: keys, passwords
    assert stat.S_IMODE(state.meta.stat().st_mode) == 0o600
    # the guest's disk (its host keys are in it, and restores keep them): qemu's group reads it
    assert (stat.S_IMODE(state.disk.stat().st_mode), state.disk.stat().st_gid) == (0o640, os.getgid())
    for folder in (state.folder, cache.root):  # nobody lists them
        assert stat.S_IMODE(folder.stat().st_mode) == 0o711


QEMU_UID = 64055  # a user in no group of the test's: as libvirt's qemu user is to a session's user


def as_user(uid: int, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command],
                          capture_output=True, text=True)


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="runs as other users (root, setpriv)")
def test_a_user_outside_qemus_group_shares_a_backing_file_with_qemu_alone() -> None:
    # a user who may not chgrp to qemu's group: an ACL entry for qemu's user, nobody else
    user, other = 23456, 34567
    folder = Path(tempfile.mkdtemp(prefix="ost-unit-", dir="/var/tmp"))  # where other users reach
    try:
        folder.chmod(0o711)
        layer = folder / "disk.qcow2"
        layer.write_text("guest data")
        os.chown(layer, user, user)
        done = as_user(user, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path.cwd())!r}); "
                       f"from pathlib import Path; from pytest_ostimages.state.folders import share_with_qemu; "
                       f"share_with_qemu(Path({str(layer)!r}), ({QEMU_UID}, {QEMU_UID}))")
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(layer.stat().st_mode) & 0o007 == 0 and layer.stat().st_gid == user
        assert as_user(QEMU_UID, "cat", str(layer)).stdout == "guest data"
        assert as_user(other, "cat", str(layer)).returncode != 0
    finally:
        shutil.rmtree(folder)


# --- 10: inputs that must be usage errors at configure time -------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--ost-boot-timeout", "nan", "expected a number of seconds greater than 0"),
    ("--ost-boot-timeout", "inf", "expected a number of seconds greater than 0"),
    ("--ost-deploy-timeout", "-1", "expected a number of seconds greater than 0"),
    ("--ost-workdir", "relative/work", "expected an absolute path"),
    ("--ost-dns-domain", "-bad-.test", "labels of letters, digits and '-', not starting or ending with '-'"),
    ("--ost-dns-domain", f"{'x' * 64}.test", "at most 63 characters"),
])
def test_a_bad_value_is_a_usage_error_naming_the_option(pytester: pytest.Pytester, option: str, value: str,
                                                         message: str) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(f"{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {option}={value!r}: *{message}*"])


@pytest.mark.parametrize("share", [[], ["--ost-share"]])
def test_xdist_workers_cannot_reuse(pytester: pytest.Pytester, share: list[str]) -> None:
    # each worker would attach to (or drop) the one kept environment of the work root
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-n", "2", "--ost-reuse", *share)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --ost-reuse keeps one session's VMs for the next session; with "
                                 "-n/--numprocesses each xdist worker is a session of its own*"])


def test_an_init_config_vm_off_the_management_network_is_refused_before_anything(pytester: pytest.Pytester,
                                                                                  roots) -> None:
    root, _ = roots
    config = pytester.path / "suite" / "ost.json"
    config.parent.mkdir()
    config.write_text(json.dumps({
        "networks": {"management": {"is_management": True, "nics": ["engine"]}, "storage": {"nics": ["vm-s"]}},
        "vms": {"engine": {"nics": {"engine": {}}, "root_disk_var": "OST_IMAGES_BASE"},
                "vm": {"nics": {"vm-s": {}}, "root_disk_var": "OST_IMAGES_BASE"}}}))
    (root / kept.KEPT_FILE).write_text("{}")  # whatever is kept stays until a session can run
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(f"--ost-init-config={config}", f"--ost-workdir={root}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: init-config {config}: vms.vm.nics: none of the VM's NICs (vm-s) is on "
                                 f"the management network 'management'*"])
    assert (root / kept.KEPT_FILE).read_text() == "{}"


# --- 12: a snapshot libvirt refuses is a VMError that says so -----------------------------------


def test_a_refused_snapshot_is_a_vm_error(conn, tmp_path: Path) -> None:
    import paramiko

    from pytest_ostimages.errors import VMError
    from pytest_ostimages.guest.ssh import SSH
    from pytest_ostimages.guest.vm import VM
    from pytest_ostimages.images.catalog import Image

    domain = conn.createXML("<domain type='test'><name>ost-0ddba11c-clean</name><memory>1024</memory>"
                            "<os><type>hvm</type></os></domain>")
    vm = VM("ost-0ddba11c-clean", "clean", "clean.ost.test", ipaddress.IPv4Address("127.0.0.1"), "52:54:00:00:00:01",
            Image("testos", "base", tmp_path / "b.qcow2", (tmp_path / "b.qcow2",), ("qcow2",)),
            tmp_path / "o.qcow2", tmp_path / "c.log", domain, SSH("127.0.0.1", paramiko.RSAKey.generate(1024)))
    try:
        with pytest.raises(VMError, match=r"VM clean \(ost-0ddba11c-clean\) could not go back to snapshot "
                                          r"'ost-clean': libvirt says .*The VM is running"):
            vm.revert()  # there is no such snapshot
    finally:
        domain.destroy()


# --- a revert sets the clock of a guest whose agent libvirt has not heard of again yet --------------


class JustRestored:
    """A test-driver domain as libvirt shows a running guest whose agent has its channel open, and,
    right after a restore, "disconnected" until QEMU replays the guest's open (measured: 40 ms on
    a loaded host)."""

    def __init__(self, domain) -> None:
        self._domain, self.agent = domain, "connected"

    def __getattr__(self, name: str):
        return getattr(self._domain, name)

    def XMLDesc(self, flags: int = 0) -> str:
        root = etree.fromstring(self._domain.XMLDesc(flags).encode())
        root.find("devices/channel/target").set("state", self.agent)
        return etree.tostring(root, encoding="unicode")

    def revertToSnapshot(self, snapshot, flags: int) -> int:
        self.agent = "disconnected"
        return self._domain.revertToSnapshot(snapshot, flags)


def test_a_reverted_guest_s_clock_is_set_though_libvirt_has_not_seen_its_agent_again(
        conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import paramiko

    from pytest_ostimages.guest import vm as vm_module
    from pytest_ostimages.guest.ssh import SSH
    from pytest_ostimages.images.catalog import Image

    domain = conn.createXML("<domain type='test'><name>ost-0ddba11c-clean</name><memory>1024</memory>"
                            "<os><type>hvm</type></os><devices><channel type='unix'><source mode='bind'/>"
                            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>")
    asked = []
    monkeypatch.setattr(vm_module, "wait_for_agent", lambda dom, timeout: asked.append(timeout) or False)
    vm = vm_module.VM("ost-0ddba11c-clean", "clean", "clean.ost.test", ipaddress.IPv4Address("127.0.0.1"),
                      "52:54:00:00:00:01", Image("testos", "base", tmp_path / "b.qcow2", (tmp_path / "b.qcow2",),
                                                 ("qcow2",)),
                      tmp_path / "o.qcow2", tmp_path / "c.log", JustRestored(domain),
                      SSH("127.0.0.1", paramiko.RSAKey.generate(1024)))
    try:
        domain.snapshotCreateXML("<domainsnapshot><name>ost-clean</name></domainsnapshot>", 0)
        vm.revert()
    finally:
        domain.destroy()
    # its agent was asked for (the test driver has none to answer): not left at the snapshot's time unsaid
    assert asked == [30]
    assert "clean: its clock stays at the snapshot's time: its guest agent did not answer within 30 s" in caplog.text


# --- checkpoint fixtures that cannot be: one clear error at definition --------------------------


@pytest.mark.parametrize("definition, message", [
    ("@checkpoint(scope='function')\ndef step(): return 1\n", "is function-scoped, but a checkpoint saves the whole "
                                                             "session's VMs; it must be session-scoped"),
    ("@checkpoint\ndef step():\n    yield 1\n", "yields; a checkpoint must return its value"),
    ("import pytest\n@checkpoint\n@pytest.fixture\ndef step(): return 1\n", "apply @checkpoint to a plain function"),
])
def test_a_checkpoint_that_cannot_be_is_refused_at_definition(pytester: pytest.Pytester, definition: str,
                                                               message: str) -> None:
    pytester.makeconftest("from pytest_ostimages import checkpoint\n" + definition)
    pytester.makepyfile("def test_x(step):\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret != 0
    assert message in result.stdout.str() + result.stderr.str()
