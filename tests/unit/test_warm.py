"""Warm start without VMs: the save image's XML rewritten in place, the cache's bounds."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from pytest_ostimages.errors import WarmStartError
from pytest_ostimages.hypervisor.saveimage import HEADER, MAGIC, patch_save_image, restored_xml
from pytest_ostimages.lab.networks import entry
from pytest_ostimages.state.owner import Label
from pytest_ostimages.state.warmcache import SavedState, WarmCache

SAVED = b"<domain type='qemu'><name>ost-aaaaaaaa-engine</name><uuid>0f6e3c6e-0000-4000-8000-000000000001</uuid>" \
        b"<devices><disk type='file' device='disk'><source file='/w/aaaaaaaa/old.qcow2'/><address type='pci'/>" \
        b"</disk><interface type='network'><source network='ost-aaaaaaaa'/><mac address='52:54:00:00:00:01'/>" \
        b"<address type='pci' slot='3'/></interface><serial type='file'><source path='/w/old.log'/></serial>" \
        b"</devices></domain>"
FRESH = b"<domain type='qemu'><name>ost-bbbbbbbb-engine</name><metadata><owner/></metadata><devices>" \
        b"<disk type='file' device='disk'><source file='/w/bbbbbbbb/new.qcow2'/><backingStore type='file'/></disk>" \
        b"<interface type='network'><source network='ost-bbbbbbbb'/><mac address='52:54:00:00:00:02'/></interface>" \
        b"<serial type='file'><source path='/w/new.log'/></serial></devices></domain>"


def save_image(path: Path, room: int = 4096) -> bytes:
    cookie, stream = b"<qemuDomainSaveCookie/>\0", os.urandom(8192)
    xml = SAVED + b"\0" * (room - len(SAVED))
    path.write_bytes(HEADER.pack(MAGIC, 2, room + len(cookie), 1, 0, room, *[0] * 14) + xml + cookie + stream)
    return stream


def test_the_copy_has_the_new_xml_and_the_same_cookie_and_stream(tmp_path: Path) -> None:
    stream = save_image(tmp_path / "memory.save")
    longer = FRESH.replace(b"/w/bbbbbbbb/new.qcow2", b"/w/" + b"x" * 5000 + b"/new.qcow2")  # more than the room
    patch_save_image(tmp_path / "memory.save", tmp_path / "copy.save", restored_xml(etree.fromstring(longer)))
    data = (tmp_path / "copy.save").read_bytes()
    fields = HEADER.unpack(data[:HEADER.size])
    assert fields[0] == MAGIC and fields[1] == 2 and fields[3] == 1  # magic, version, was_running kept
    data_len, cookie_offset = fields[2], fields[5]
    xml = data[HEADER.size:HEADER.size + cookie_offset]
    assert xml.endswith(b"\0") and b"\0" not in xml[:-1]
    assert data[HEADER.size + cookie_offset:HEADER.size + data_len] == b"<qemuDomainSaveCookie/>\0"
    assert data[HEADER.size + data_len:] == stream
    root = etree.fromstring(xml[:-1])
    assert root.findtext("name") == "ost-bbbbbbbb-engine"
    assert root.findtext("uuid") != "0f6e3c6e-0000-4000-8000-000000000001"
    disk = root.find("devices/disk")
    assert disk.find("source").get("file").endswith("/new.qcow2")
    assert disk.find("address") is not None  # the saved device layout stays
    assert disk.find("backingStore") is not None  # this session's chain comes in
    assert root.find("devices/interface/source").get("network") == "ost-bbbbbbbb"
    assert root.find("devices/interface/address").get("slot") == "3"
    assert root.find("devices/serial/source").get("path") == "/w/new.log"


def test_not_a_save_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\0" * 200)
    with pytest.raises(WarmStartError, match="not a libvirt save image"):
        patch_save_image(tmp_path / "x", tmp_path / "y", lambda root: None)


def make_state(root: Path, key: str, size: int, age: float) -> SavedState:
    folder = root / key
    folder.mkdir(parents=True)
    (folder / "memory.save").write_bytes(b"\0" * size)
    (folder / "meta.json").write_text(json.dumps({"host_key": "ssh-ed25519 AAAA"}))
    os.utime(folder / "meta.json", (age, age))
    return SavedState(folder)


def test_least_recently_used_states_go_first_but_never_one_in_use(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path, limit=2500)
    oldest, old, new = (make_state(tmp_path, k, 1000, age) for k, age in (("a" * 16, 1), ("b" * 16, 2), ("c" * 16, 3)))
    run = tmp_path.parent / f"{tmp_path.name}-runs" / "0123abcd"  # a run's work directory
    run.mkdir(parents=True)
    Label.current(run.name, run).write(run)
    assert cache.use(oldest, run)  # a running VM's disk is backed by it
    try:
        cache.evict(keep=new.key, progress=lambda _: None)
    finally:
        shutil.rmtree(run)  # the run ended
    assert oldest.exists() and not old.exists() and new.exists()
    assert cache.clear() == [oldest.key, new.key]
    assert list(tmp_path.iterdir()) == []


def test_a_run_registered_in_a_state_is_readable_by_nobody_else(tmp_path: Path) -> None:
    # users/<run> names a run's work directory; like every file of a saved state, only its owner reads it
    cache = WarmCache(tmp_path, limit=2500)
    state = make_state(tmp_path, "a" * 16, 1000, 1)
    run = tmp_path.parent / f"{tmp_path.name}-runs" / "0123abcd"
    run.mkdir(parents=True)
    Label.current(run.name, run).write(run)
    assert cache.use(state, run)
    users = state.folder / "users"
    assert [(p.name, oct(p.stat().st_mode & 0o777)) for p in [users, *users.iterdir()]] == \
        [("users", "0o700"), (run.name, "0o600")]


def test_eviction_stops_as_soon_as_the_cache_fits(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path, limit=2500)
    states = [make_state(tmp_path, k * 16, 1000, age) for k, age in (("a", 1), ("b", 2), ("c", 3), ("d", 4))]
    cache.evict(keep=states[3].key, progress=lambda _: None)
    assert [s.exists() for s in states] == [False, False, True, True]


def test_a_checkpoints_key_follows_its_inputs_by_content_not_by_place(tmp_path: Path) -> None:
    from pytest_ostimages.checkpoints import checkpoint_key

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for folder in (here, elsewhere):
        folder.mkdir()
        (folder / "service.conf").write_text("port = 8080\n")
    key = checkpoint_key("parent", "def step(): ...", None, {"service.conf": here / "service.conf"})
    assert checkpoint_key("parent", "def step(): ...", None, {"service.conf": elsewhere / "service.conf"}) == key
    (elsewhere / "service.conf").write_text("port = 8081\n")
    changed = [checkpoint_key("parent", "def step(): ...", None, {"service.conf": elsewhere / "service.conf"}),
               checkpoint_key("other parent", "def step(): ...", None, {"service.conf": here / "service.conf"}),
               checkpoint_key("parent", "def step(): return 1", None, {"service.conf": here / "service.conf"}),
               checkpoint_key("parent", "def step(): ...", "param", {"service.conf": here / "service.conf"})]
    assert key not in changed and len(set(changed)) == len(changed)



# --- saved disks are whole above what outlives the run; a failed save leaves the VM running -------

def qemu(*args: str) -> str:
    import subprocess

    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def layered_disk(tmp_path: Path) -> tuple[Path, Path]:
    """An installed-like image, and a run's disk on it through a checkpoint layer in the run's folder
    (as clean_vm and warm start leave a UEFI guest's disk), each layer with its own data."""
    image, run = tmp_path / "images" / "base.qcow2", tmp_path / "0123abcd"
    image.parent.mkdir()
    run.mkdir()
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    qemu("qemu-io", "-c", "write -P 0x11 0 64k", str(image))
    frozen, disk = run / "vm.ost-clean.qcow2", run / "vm.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(frozen))
    qemu("qemu-io", "-c", "write -P 0x22 64k 64k", str(frozen))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(frozen), str(disk))
    qemu("qemu-io", "-c", "write -P 0x33 128k 64k", str(disk))
    return image, disk


def reads(path: Path) -> bool:
    """Whether the disk reads as layered_disk wrote it, through its chain."""
    return all("Pattern verification failed" not in qemu("qemu-io", "-r", "-c", f"read -P {pattern} {offset}k 64k",
                                                         str(path))
               for pattern, offset in (("0x11", 0), ("0x22", 64), ("0x33", 128)))


def vm_on(conn, disk: Path, image: Path):
    import ipaddress

    import paramiko

    from pytest_ostimages.guest.keys import HostKey
    from pytest_ostimages.guest.ssh import SSH
    from pytest_ostimages.guest.vm import VM
    from pytest_ostimages.images.catalog import Image

    domain = conn.createXML(f"<domain type='test'><name>ost-0123abcd-vm</name><memory>1024</memory>"
                            f"<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
                            f"<source file='{disk}'/><target dev='vda'/></disk></devices></domain>")
    ssh = SSH("127.0.0.1", paramiko.RSAKey.generate(1024), host_key=HostKey.generate().pkey())
    return VM("ost-0123abcd-vm", "vm", "vm.ost.test", ipaddress.IPv4Address("127.0.0.1"), "52:54:00:00:00:01",
              Image("testos", "base", image, (image,), ("qcow2",)), disk, disk.with_suffix(".log"), domain, ssh)


def test_a_saved_disk_takes_the_layers_of_the_run_with_it(conn, tmp_path: Path) -> None:
    from pytest_ostimages.lab import warm

    image, disk = layered_disk(tmp_path)
    vm = vm_on(conn, disk, image)
    vm.nics = (("management", entry(ipaddress.IPv4Network("192.168.130.0/24"), (4, 6), "vm", 10)),)
    folder = tmp_path / "warm" / "k" / "vm"
    folder.parent.mkdir(parents=True)
    warm.save_vm(vm, folder)
    state = SavedState(folder)
    assert state.data()["subnets"] == {"management": "192.168.130.0/24"}  # where a restore keeps its NIC
    info = json.loads(qemu("qemu-img", "info", "-U", "--backing-chain", "--output=json", str(state.disk)))
    assert [Path(layer["filename"]) for layer in info] == [state.disk, image]  # whole above the image
    assert reads(state.disk)
    assert warm.damage(state) is None
    shutil.rmtree(tmp_path / "0123abcd")  # the run ends: the state still reads the same
    assert reads(state.disk) and warm.damage(state) is None


def test_a_state_backed_by_a_runs_file_is_damage(tmp_path: Path) -> None:
    from pytest_ostimages.lab import warm

    image, disk = layered_disk(tmp_path)
    folder = tmp_path / "warm" / "k" / "vm"
    folder.mkdir(parents=True)
    (folder / "memory.save").write_bytes(b"saved")
    shutil.copy(disk, folder / "disk.qcow2")  # what the old code saved: only the top layer
    why = warm.damage(SavedState(folder))
    assert why is not None and "is backed by" in why and "0123abcd/vm.ost-clean.qcow2" in why


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a small filesystem (needs root)")
def test_a_save_that_fails_on_another_filesystem_leaves_the_vm_running(conn, tmp_path: Path) -> None:
    import subprocess

    from pytest_ostimages.lab import warm

    image, disk = layered_disk(tmp_path)
    qemu("qemu-io", "-c", "write -P 0x44 1M 4M", str(disk))  # more than the small filesystem holds
    vm = vm_on(conn, disk, image)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(WarmStartError, match=f"cannot copy the disk {disk} into the saved state"):
            warm.save_vm(vm, small / "vm")
        assert vm.state() == "running" and vm.domain.name() == "ost-0123abcd-vm"
        assert reads(disk)  # its own disk, as it was
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_restore_reads_the_changed_image_through_a_fifo_without_a_copy(tmp_path: Path) -> None:
    import threading

    from pytest_ostimages.hypervisor.saveimage import streamed

    save_image(tmp_path / "memory.save")
    patch_save_image(tmp_path / "memory.save", tmp_path / "copy.save", restored_xml(etree.fromstring(FRESH)))
    read: list[bytes] = []
    with streamed(tmp_path / "memory.save", tmp_path / "vm.memory", restored_xml(etree.fromstring(FRESH))) as fifo:
        reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()))  # as libvirt's restore
        reader.start()
        reader.join(10)
    assert read[0][:HEADER.size] == (tmp_path / "copy.save").read_bytes()[:HEADER.size]
    # the same save image as a written copy, but for its new random UUID; no file left behind
    assert len(read[0]) == (tmp_path / "copy.save").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.save", "memory.save"]


def test_a_fifo_nobody_reads_is_gone_at_once(tmp_path: Path) -> None:
    # libvirt refused the restore before it opened the FIFO: the feeder must not wait for ever
    import time

    from pytest_ostimages.hypervisor.saveimage import streamed

    save_image(tmp_path / "memory.save")
    start = time.monotonic()
    with streamed(tmp_path / "memory.save", tmp_path / "vm.memory", restored_xml(etree.fromstring(FRESH))):
        pass
    assert time.monotonic() - start < 5 and not (tmp_path / "vm.memory").exists()


class HotPlugGuest:
    """A domain's hot-plug calls as a guest sees them: a NIC reaches its kernel only a few polls after
    its attach, and the guest names its NICs eth0, eth1, ... in the order they reach it."""

    def __init__(self, polls_to_probe: dict[str, int]) -> None:
        self.polls_to_probe, self.pending, self.names = polls_to_probe, {}, []

    def attachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802 (libvirt's name)
        mac = etree.fromstring(xml).find("mac").get("address")
        self.pending[mac] = self.polls_to_probe.get(mac, 10**6)

    def has(self, mac: str) -> bool:
        """One poll of the guest: every pending NIC comes one step closer; those that arrive are named."""
        self.pending = {other: polls - 1 for other, polls in self.pending.items()}
        self.names += [other for other, polls in self.pending.items() if polls <= 0]
        self.pending = {other: polls for other, polls in self.pending.items() if polls > 0}
        return mac in self.names


def test_a_restored_guest_gets_its_new_nics_in_order_even_when_a_later_one_would_probe_first() -> None:
    from pytest_ostimages.lab.warm import attach_nics

    macs = ["52:54:00:00:01:01", "52:54:00:00:02:01", "52:54:00:00:03:01"]
    nics = [etree.fromstring(f"<interface type='network'><mac address='{mac}'/><alias name='net{i}'/>"
                             f"<target dev='vnet{i}'/></interface>") for i, mac in enumerate(macs)]
    guest = HotPlugGuest({macs[0]: 5, macs[1]: 1, macs[2]: 1})  # the management NIC is the slowest to probe
    attach_nics(guest, nics, guest.has)
    while guest.pending:
        guest.has("")
    assert guest.names == macs  # eth0 is the management NIC, as after a boot


def test_a_new_nic_the_guest_never_sees_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_ostimages.lab import warm

    monkeypatch.setattr(warm, "NIC_SEEN_TIMEOUT", 0.3)
    nics = [etree.fromstring(f"<interface type='network'><mac address='52:54:00:00:0{i}:01'/></interface>")
            for i in (1, 2)]
    with pytest.raises(WarmStartError, match="did not see its new NIC 52:54:00:00:01:01 within"):
        warm.attach_nics(HotPlugGuest({}), nics, lambda mac: False)


@pytest.mark.parametrize("offset_ns", [86_400_250_000_000, 3_059_000_000, -1_500_000_000])
def test_a_restored_guests_clock_is_moved_by_its_offset_from_the_time_it_reads_as_the_script_runs(
        tmp_path: Path, offset_ns: int) -> None:
    """A busy guest's agent may start the script seconds after it was sent: the clock is moved by the
    offset from what the guest's clock reads as the script runs, never set to a time the host read
    before sending it (a restored guest was 3 s behind under load, a reverted one 13 s)."""
    from pytest_ostimages.guest.agent import clock_script

    # coreutils' date, except that what it is told to set is read back instead of set
    real = shutil.which("date")
    (tmp_path / "date").write_text(f'#!/bin/sh\n[ "$1 $2" = "-u -s" ] && exec {real} -u -d "$3" +%s.%N '
                                   f'>{tmp_path / "set"}\nexec {real} "$@"\n')
    (tmp_path / "date").chmod(0o755)
    done = subprocess.run(["sh", "-c", clock_script(offset_ns)], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    # what it would have set, against this clock plus the offset (the guest's clock here is this one)
    assert abs(float((tmp_path / "set").read_text()) - (time.time() + offset_ns / 1e9)) < 0.5
