"""Every bad input ends the VM fixtures with one clear message, no traceback from
inside the plugin, and nothing created: pytester sessions on libvirt's test driver
and tiny images of the test's own (no VM boots here; see tests/e2e for those)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DISTRO = "testos"



@pytest.fixture
def run(pytester: pytest.Pytester, images_dir: Path, workdir: Path):
    """Run a one-test session that asks for a VM and check that it failed cleanly."""
    pytester.makepyfile("def test_needs_a_vm(ost_vm):\n    pass\n")

    def run_session(*args: str) -> pytest.RunResult:
        result = pytester.runpytest_inprocess(
            f"--ost-images-dir={images_dir}", f"--ost-workdir={workdir}",
            "--ost-libvirt-uri=test:///default", "--ost-image=engine-installed", *args)
        result.assert_outcomes(errors=1)
        output = result.stdout.str()
        assert "pytest_ostimages/" not in output, "a traceback from inside the plugin"
        assert "During handling" not in output
        # nothing was made: no work directory (the subnet lock file may exist)
        assert not [p for p in workdir.glob("*") if p.is_dir()] if workdir.exists() else True
        return result

    return run_session


def test_no_images_installed(run, images_dir: Path) -> None:
    shutil.rmtree(images_dir)
    run().stdout.fnmatch_lines(["*No ost-images are installed*", "*dnf install ost-images-*"])


def test_unknown_distro(run) -> None:
    run("--ost-distro=el9stream").stdout.fnmatch_lines([
        "*Distro 'el9stream' is not installed in *", "*testos: base, engine-installed*"])


def test_unknown_layer(run) -> None:
    run("--ost-image=storage-installed").stdout.fnmatch_lines([
        "*Layer 'storage-installed' of testos is not installed*",
        "*Installed layers of testos: base, engine-installed, he-installed, host-installed"])


def test_image_file_that_is_not_qcow2(run, images_dir: Path) -> None:
    path = images_dir / f"{DISTRO}-engine-installed.qcow2"
    path.chmod(0o644)
    path.write_bytes(b"\0" * 4096)
    run().stdout.fnmatch_lines(["*is not a qcow2 image (qemu-img sees format 'raw')*"])


def test_truncated_image(run, images_dir: Path) -> None:
    path = images_dir / f"{DISTRO}-engine-installed.qcow2"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:120])  # the header survives, the tables do not
    run().stdout.fnmatch_lines(["*engine-installed.qcow2 cannot be used: it is damaged or truncated*"])


def test_backing_file_missing(run, images_dir: Path) -> None:
    (images_dir / f"{DISTRO}-base.qcow2").unlink()
    run().stdout.fnmatch_lines(["*engine-installed.qcow2 is installed, but its backing chain is broken: its backing file*does not exist*",
                                f"*{DISTRO}-base.qcow2*"])


def test_ssh_key_missing(run, images_dir: Path) -> None:
    (images_dir / f"{DISTRO}_id_rsa").unlink()
    run().stdout.fnmatch_lines([f"*No SSH key for {DISTRO}: expected {images_dir}/{DISTRO}_id_rsa*"])


def test_ssh_key_not_a_key(run, images_dir: Path) -> None:
    # the fixture's key file holds text, not a key
    run().stdout.fnmatch_lines([f"*Cannot use {images_dir}/{DISTRO}_id_rsa as an SSH private key*"])


@pytest.fixture
def real_key(images_dir: Path) -> None:
    key = images_dir / f"{DISTRO}_id_rsa"
    key.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(key)], check=True)


def test_libvirt_binding_missing(run, pytester: pytest.Pytester, real_key: None) -> None:
    pytester.makeconftest("import sys\nsys.modules['libvirt'] = None\n")
    run().stdout.fnmatch_lines(["*The libvirt Python binding is not installed*pip install libvirt-python*"])


def test_libvirt_unreachable(run, real_key: None) -> None:
    run("--ost-libvirt-uri=qemu+unix:///system?socket=/nonexistent/sock").stdout.fnmatch_lines(
        ["*Cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent/sock*",
         "*Is the daemon running?*"])


def test_kvm_requested_but_unavailable(run, real_key: None) -> None:
    run("--ost-virt-type=kvm").stdout.fnmatch_lines(
        ["*KVM was requested (--ost-virt-type=kvm) but libvirt at test:///default cannot use it*",
         "*--ost-virt-type=qemu*"])


def test_work_directory_not_traversable(run, real_key: None, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    run(f"--ost-workdir={private}/work").stdout.fnmatch_lines(
        [f"*is inside {private}, which other users cannot traverse (mode drwx------)*"])
    assert [p.name for p in (private / "work").iterdir()] == []  # the session's dir is gone again


@pytest.mark.skipif(os.getuid() != 0, reason="makes a folder of another user (needs root)")
def test_work_root_of_another_user(run, real_key: None, tmp_path: Path) -> None:
    # the first user of a shared default work root made it; a second user's session must say so
    theirs = tmp_path / "pytest-ostimages"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 12345, 12345)
    run(f"--ost-workdir={theirs}").stdout.fnmatch_lines(
        [f"*The work root {theirs} belongs to uid 12345, not to you (root): each user needs one of their own*"
         "--ost-workdir=/var/tmp/pytest-ostimages-root*"])
    assert list(theirs.iterdir()) == []


def path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH with every command of this one but `tools` (a host without them)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for command in Path(directory).glob("*") if Path(directory).is_dir() else []:
            if command.name not in tools and not (folder / command.name).exists():
                (folder / command.name).symlink_to(command)
    return str(folder)


@pytest.mark.parametrize("tool, package", [("qemu-img", "qemu-utils"), ("ip", "iproute2")])
def test_a_tool_the_plugin_needs_is_missing(run, real_key: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            tool: str, package: str) -> None:
    monkeypatch.setenv("PATH", path_without(tmp_path, tool))
    run().stdout.fnmatch_lines([f"*{'qemu-img is' if tool == 'qemu-img' else 'The ip command is'} not installed*"
                                f"Install {package} (Debian)*"])


def test_subnet_pool_exhausted(run, real_key: None) -> None:
    # the test driver's own "default" network holds 192.168.122.0/24
    run("--ost-subnet-pool=192.168.122.0/24").stdout.fnmatch_lines(
        ["*No free /24 left in the subnet pool 192.168.122.0/24*--ost-subnet-pool*"])


def test_template_with_invalid_xml(run, real_key: None, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "domain.xml").write_text("<domain><name>broken</domain>\n")
    run(f"--ost-templates={templates}").stdout.fnmatch_lines(
        [f"*Template {templates}/domain.xml is not valid XML: *line 1*"])
