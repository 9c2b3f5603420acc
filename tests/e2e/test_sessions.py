"""Whole pytest sessions with the plugin, run in a subprocess, checked from outside:
the option boots what it names, failures say what happened, nothing is left."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pytest_ostimages import Catalog

from pytest_ostimages.waiting import poll

from .helpers import DISTRO, IMAGES, INNER, LIBVIRT_URI, WORKDIR, libvirt_objects


def test_ost_image_boots_that_layer(pytester: pytest.Pytester, unchanged: None, tmp_path: Path) -> None:
    pytester.makepyfile("""
        def test_layer(ost_vm):
            assert ost_vm.ssh("cat /etc/ost-layer").stdout.strip() == "host-installed"
            # writes go to the overlay, never to the installed images
            ost_vm.ssh("dd if=/dev/urandom of=/root/junk bs=1M count=16 && sync", check=True)

        def test_that_fails(ost_vm):
            ost_vm.ssh("logger -t ost-e2e marker-in-the-journal")
            assert ost_vm.ssh("false").returncode == 0
    """)
    artifacts = tmp_path / "artifacts"
    result = pytester.runpytest_subprocess("--ost-image=host-installed", f"--ost-artifacts={artifacts}",
                                           *INNER)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        f"ost-images: {IMAGES} (found via rpm)*",
        f"ost-images:   {DISTRO}-host-installed (ost-images-{DISTRO}-host-installed-*)",
        f"*libvirt * at {LIBVIRT_URI}: * guests*",
        f"*vm: booting {DISTRO}-host-installed*", "*vm: ssh ready in *"])
    # the failed test's report carries its VM's console and journal tails
    result.stdout.fnmatch_lines(["*ost vm: serial console (last 30 lines, running)*",
                                 "*ost vm: journal (last 30 lines)*", "*marker-in-the-journal*"])
    [run] = artifacts.iterdir()
    files = {str(p.relative_to(run)) for p in run.rglob("*")}
    assert {"network.xml", "dhcp-leases.json", "vm/console.log", "vm/domain.xml", "vm/journal.txt",
            "vm/var-log.tar.gz", f"{DISTRO}-host-installed-pkglist.txt"} <= files
    assert "marker-in-the-journal" in (run / "vm" / "journal.txt").read_text()
    assert "Linux version" in (run / "vm" / "console.log").read_text()


def test_vm_that_never_boots_shows_its_console(pytester: pytest.Pytester, unchanged: None,
                                               linked_images: Path) -> None:
    # A disk with no OS: the BIOS reports it on the serial console, sshd never comes.
    blank = linked_images / "blank.qcow2"  # where qemu's user can reach it
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    pytester.makepyfile("def test_never(ost_vm):\n    pass\n")
    # (a blank disk has no partition table to tell its firmware by)
    result = pytester.runpytest_subprocess(f"--ost-image={blank}", "--ost-boot-timeout=20", "--ost-firmware=bios", *INNER)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        f"*VM vm (ost-*-vm, image {DISTRO}-blank) not reachable over SSH within 20 s*",
        "*state: running*",
        "*last 30 lines of the serial console*",
        "*No bootable device*",
    ])
    # its console stopped at that line: it is named stuck, not slow (as a TCG guest stuck in its kernel was)
    result.stdout.fnmatch_lines(["*within 20 s: *; its console has printed nothing for the last * s.",
                                 "*stuck, not slow, and more --ost-boot-timeout would not help*"])
    assert "pytest_ostimages/" not in result.stdout.str()  # no traceback from inside the plugin


def test_a_qemu_that_crashes_while_booting_is_started_once_more(pytester: pytest.Pytester, unchanged: None) -> None:
    # as a TCG qemu crashed here now and then while its guest probed its PCI devices: the VM is started
    # once more, with a warning that names qemu's crash, and the test gets it
    pytester.makepyfile("def test_x(ost_vm):\n    assert ost_vm.ssh('true').returncode == 0\n")
    with crashing_session(pytester) as session:
        crash_qemu(session)
        output = session.communicate(timeout=600)[0]
    assert session.returncode == pytest.ExitCode.OK, output
    pytest.LineMatcher(output.splitlines()).fnmatch_lines([
        "*vm: its qemu process crashed while it booted (the hypervisor's qemu, not the image: libvirt's log of it "
        "/var/log/libvirt/qemu/ost-*-vm.log); starting it once more*", "*vm: ssh ready in *"])


def test_a_qemu_that_crashes_twice_while_booting_is_named(pytester: pytest.Pytester, unchanged: None) -> None:
    # the second crash is an error that names qemu and libvirt's log of it, with no hint about the image
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    with crashing_session(pytester) as session:
        crash_qemu(session, crash_qemu(session))
        output = session.communicate(timeout=120)[0]
    assert session.returncode == pytest.ExitCode.TESTS_FAILED, output
    result = pytest.LineMatcher(output.splitlines())
    result.fnmatch_lines([f"*VM vm (ost-*-vm, image {DISTRO}-base) stopped while booting: its qemu process "
                          f"crashed again, after it was started once more; libvirt's log of it "
                          f"(/var/log/libvirt/qemu/ost-*-vm.log) ends where qemu died*",
                          "*state: shut off: its qemu process crashed*"])
    assert "Check that the image boots" not in output


@contextlib.contextmanager
def crashing_session(pytester: pytest.Pytester) -> Iterator["subprocess.Popen[str]"]:
    """An inner session booting the base image, its output piped; torn down if the test fails half-way."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--ost-image=base", *INNER], cwd=pytester.path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=120)


def crash_qemu(session: "subprocess.Popen[str]", console_past: int = 0) -> int:
    """SIGSEGV the qemu of `session`'s domain once its guest has written more than `console_past` bytes
    to its serial console (it boots); return the console's size once that qemu is gone."""
    found = poll(lambda: qemu_of(session.pid, console_past), 120, 0.2,
                 retry_on=(FileNotFoundError,))  # console not made yet
    assert found is not None, f"the inner session's guest wrote nothing past byte {console_past} within 120 s"
    qemu, console = found
    os.kill(qemu, signal.SIGSEGV)
    assert poll(lambda: not Path(f"/proc/{qemu}").exists(), 30, 0.1), f"qemu {qemu} outlived SIGSEGV by 30 s"
    return console.stat().st_size  # all it wrote: a size past this is the next qemu's


def qemu_of(pid: int, console_past: int) -> Optional[tuple[int, Path]]:
    """The pid of the qemu process of session `pid`'s domain and its console, once its guest has
    written more than `console_past` bytes to it."""
    consoles = [WORKDIR / name.split("-")[1] / f"{name}.console.log"
                for name in (o.split()[1] for o in libvirt_objects(pid) if o.startswith("domain "))]
    booting = [console for console in consoles if console.stat().st_size > console_past]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            for console in booting:
                if f"guest={console.name.removesuffix('.console.log')},".encode() in cmdline.read_bytes():
                    return int(cmdline.parent.name), console
    return None


def test_guest_that_refuses_the_key(pytester: pytest.Pytester, unchanged: None,
                                    linked_images: Path) -> None:
    # the same images, but a key the guests do not know
    for key in linked_images.glob(f"{DISTRO}_id_rsa*"):
        key.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(linked_images / f"{DISTRO}_id_rsa")],
                   check=True)
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("--ost-image=base", f"--ost-images-dir={linked_images}",
                                           "--ost-boot-timeout=240", *INNER)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*VM vm (ost-*-vm, image {DISTRO}-base) answers SSH but refuses the key "
                                 "for root*", "*last 30 lines of the serial console*"])


def test_unknown_layer_lists_installed_ones(pytester: pytest.Pytester, unchanged: None) -> None:
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("--ost-image=storage-installed", *INNER)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        f"*Layer 'storage-installed' of {DISTRO} is not installed in {IMAGES}.",
        f"*Installed layers of {DISTRO}: {', '.join(Catalog.discover(IMAGES).layer_names(DISTRO))}",
    ])


def test_libvirt_not_reachable(pytester: pytest.Pytester, unchanged: None) -> None:
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--ost-image=base", "--ost-libvirt-uri=qemu+unix:///system?socket=/nonexistent/sock", *INNER)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Cannot connect to libvirt at qemu+unix:///system?socket=*",
                                 "*Is the daemon running?*"])


def test_image_unreadable_for_qemu(pytester: pytest.Pytester, unchanged: None,
                                   linked_images: Path) -> None:
    # root can read it, libvirt's qemu user cannot: the start fails, and says why
    private = linked_images / f"{DISTRO}-secret.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(IMAGES / f"{DISTRO}-base.qcow2"), str(private)], check=True)
    private.chmod(0o600)
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("--ost-image=secret", f"--ost-images-dir={linked_images}", *INNER)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Cannot start domain ost-*-vm:*Permission denied*",
                                 "*qemu user must be able to read every image of the chain*"])


# How a KVM that cannot run the guest shows it depends on the host's KVM, not on the CPU mode asked for
# (seen on two kinds of lab machine with either mode): qemu refused at start, or the guest stopped early.
KVM_FAILURES = ("*Cannot start domain ost-*-vm: *failed to set MSR*",
                "*stopped by KVM while booting: libvirt's log of it (*) says 'KVM internal error. Suberror: 1'*")


@pytest.mark.parametrize("cpu_mode", ["default", "auto"])  # auto: host-passthrough
def test_kvm_that_cannot_run_the_guest_is_named(pytester: pytest.Pytester, unchanged: None, cpu_mode: str) -> None:
    # a host whose /dev/kvm opens but whose KVM cannot run the guest (nested, paravirtualized: this
    # lab's machines): --ost-virt-type=auto would pick kvm, and the error must say what to do
    pytester.makepyfile("def test_x(ost_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("--ost-image=base", "--ost-virt-type=kvm", f"--ost-cpu-mode={cpu_mode}",
                                           *INNER)
    if result.ret == 0:
        pytest.skip("this host's KVM runs the guest: its failure cannot be shown here")
    result.assert_outcomes(errors=1)
    assert any(fnmatch.fnmatch(line, failure) for line in result.stdout.lines for failure in KVM_FAILURES), \
        result.stdout.str()
    result.stdout.fnmatch_lines(["*This host's KVM cannot run the guest (common on nested or paravirtualized "
                                 "hosts)*--ost-virt-type=qemu*"])
