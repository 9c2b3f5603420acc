"""Helpers for unit tests: real qemu-img images and real RPM databases in tmp dirs."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest

DISTRO = "testos"


@pytest.fixture(autouse=True)
def own_lock_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugin's host-wide locks in a directory of the test's own (state/files.py): unit
    tests, and the sessions pytester runs for them, leave nothing in the real one."""
    from pytest_ostimages.state.files import LOCK_DIR_VARIABLE

    directory = tmp_path_factory.mktemp("locks")
    monkeypatch.setenv(LOCK_DIR_VARIABLE, str(directory))
    return directory


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def conn():
    """libvirt's test driver: a fresh in-memory hypervisor per open."""
    from pytest_ostimages.hypervisor import connection as virt

    c = virt.connect("test:///default")
    yield c
    c.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A work directory root that libvirt's qemu user could reach (not under /tmp/pytest-of-*)."""
    path = Path(tempfile.mkdtemp(prefix="ost-unit-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path / "work"
    shutil.rmtree(path)


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """A directory laid out like /usr/share/ost-images, with real (tiny) qcow2 layers."""
    d = tmp_path / "ost-images"
    d.mkdir()
    # a base that boots with BIOS as far as the plugin can tell: an MBR with boot code
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as disk:
        disk.write(b"\xeb\x63\x90" + b"\0" * 507 + b"\x55\xaa")
        disk.truncate(16 * 2**20)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(d / f"{DISTRO}-base.qcow2"))
    raw.unlink()
    for layer, parent in (("engine-installed", "base"), ("host-installed", "base"),
                          ("he-installed", "host-installed")):
        # relative backing names, as ost-images ships them
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "qcow2",
                        "-b", f"{DISTRO}-{parent}.qcow2", f"{DISTRO}-{layer}.qcow2"],
                       cwd=d, check=True, capture_output=True)
        (d / f"{DISTRO}-{layer}-pkglist.txt").write_text("pkg-a-1\npkg-b-2\n")
        (d / f"{DISTRO}-{layer}-pkglist-diff.txt").write_text("pkg-b-2\n")
    (d / f"{DISTRO}_id_rsa").write_text("not really a key\n")
    (d / f"{DISTRO}_id_rsa.pub").write_text("ssh-rsa AAAA test\n")
    for path in d.iterdir():
        path.chmod(0o444 if path.suffix == ".qcow2" else 0o644)
    return d


@pytest.fixture
def images(images_dir: Path) -> Path:
    """The unit images with a real SSH key."""
    key = images_dir / f"{DISTRO}_id_rsa"
    key.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return images_dir


@pytest.fixture
def rpm_db(tmp_path: Path) -> Callable[[str, list[Path]], list[str]]:
    """Register a package owning `files` in a private RPM database.

    Returns the rpm command prefix that queries that database. The package is
    built by rpmbuild and installed with --justdb: the database is real, the
    files are the test's own. Needs rpm and rpmbuild (Debian's package rpm, which
    .ci/setup installs); the test is skipped, saying so, without them.
    """
    missing = [tool for tool in ("rpm", "rpmbuild") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (Debian package rpm) for a real RPM database")
    db = tmp_path / "rpmdb"
    top = tmp_path / "rpmbuild"
    subprocess.run(["rpm", "--dbpath", str(db), "--initdb"], check=True)

    def install(name: str, files: list[Path]) -> list[str]:
        spec = top / f"{name}.spec"
        spec.parent.mkdir(parents=True, exist_ok=True)
        listing = "\n".join(str(f) for f in files)
        install_cmds = "\n".join(f"mkdir -p %{{buildroot}}{f.parent} && touch %{{buildroot}}{f}"
                                 for f in files)
        spec.write_text(textwrap.dedent(f"""\
            Name: {name}
            Version: 1.0
            Release: 7
            Summary: test package
            License: none
            BuildArch: noarch
            AutoReqProv: no
            %description
            test
            %install
            """) + install_cmds + "\n%files\n" + listing + "\n")
        subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {top}", str(spec)],
                       check=True, capture_output=True)
        rpm_file = next((top / "RPMS" / "noarch").glob(f"{name}-1.0-7*.rpm"))
        subprocess.run(["rpm", "--dbpath", str(db), "-i", "--justdb", "--nodeps", str(rpm_file)],
                       check=True, capture_output=True)
        return ["rpm", "--dbpath", str(db)]

    return install
