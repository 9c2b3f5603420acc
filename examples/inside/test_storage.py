"""Storage the way vdsm's functional tests use it: root, a loop device, LVM, a filesystem."""

import os
import subprocess
import uuid
from pathlib import Path

import pytest


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as disk:
        disk.truncate(128 * 1024 * 1024)
    device = run("losetup", "--find", "--show", str(backing)).strip()
    yield device
    run("losetup", "--detach", device)


@pytest.fixture
def volume_group(loop_device):
    name = f"ostvg{uuid.uuid4().hex[:8]}"
    run("pvcreate", "--quiet", loop_device)
    run("vgcreate", "--quiet", name, loop_device)
    yield name
    run("vgremove", "--quiet", "--force", name)
    run("pvremove", "--quiet", loop_device)


def test_root_on_a_real_kernel_with_systemd():
    assert os.geteuid() == 0
    assert Path("/proc/1/comm").read_text().strip() == "systemd"


def test_loop_device_is_a_block_device(loop_device):
    assert Path(loop_device).is_block_device()
    assert run("blockdev", "--getsize64", loop_device).strip() == str(128 * 1024 * 1024)


def test_logical_volume_with_a_filesystem(volume_group, tmp_path):
    run("lvcreate", "--quiet", "--yes", "--name", "data", "--size", "64M", volume_group)
    device = f"/dev/{volume_group}/data"
    run("mkfs.ext4", "-q", device)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run("mount", device, str(mountpoint))
    try:
        payload = os.urandom(1024 * 1024)
        (mountpoint / "payload").write_bytes(payload)
        run("sync")
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        assert (mountpoint / "payload").read_bytes() == payload
        assert "ext4" in run("findmnt", "--noheadings", "--output", "FSTYPE", str(mountpoint))
    finally:
        run("umount", str(mountpoint))
        run("lvremove", "--quiet", "--yes", f"{volume_group}/data")


@pytest.mark.demo_fail
def test_fails_on_purpose():
    sizes = {"pv": 128, "lv": 64}
    assert sizes["lv"] == sizes["pv"], "this test fails on purpose (-m demo_fail)"
