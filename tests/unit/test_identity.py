"""Host keys made by the plugin, as OpenSSH sees them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pytest_ostimages.guest.identity import fixup_script
from pytest_ostimages.guest.keys import HostKey, fingerprint, known_hosts_line, public_key


def test_generated_host_key_is_what_openssh_reads(tmp_path: Path) -> None:
    key = HostKey.generate()
    (tmp_path / "key").write_text(key.private)
    (tmp_path / "key").chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(tmp_path / "key")], capture_output=True,
                             text=True, check=True).stdout.split()[:2]
    assert derived == key.public.split()[:2]
    (tmp_path / "key.pub").write_text(key.public + "\n")
    listed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "key.pub")], capture_output=True,
                            text=True, check=True).stdout.split()[1]
    assert fingerprint(key.pkey()) == listed
    assert HostKey.generate().public != key.public


def test_known_hosts_line_is_what_openssh_matches(tmp_path: Path) -> None:
    key = HostKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line(["192.0.2.10", "engine.ost.test", "engine"], key.pkey()))
    for name in ("192.0.2.10", "engine.ost.test", "engine"):
        found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known)], capture_output=True, text=True)
        assert found.returncode == 0, name
    assert public_key(key.public) == key.pkey()


def test_fixup_quotes_what_it_is_given() -> None:
    key = HostKey.generate()
    script = fixup_script("engine", "engine.ost.test", "192.0.2.10", key)
    assert "hostname engine\n" in script and "192.0.2.10 engine.ost.test engine >>/etc/hosts" in script
    assert key.private.strip() in script
    assert "'a b; rm -rf /'" in fixup_script("a b; rm -rf /", "x", "192.0.2.10", key)


def test_nocloud_seed_carries_identity_and_the_suites_user_data(tmp_path: Path) -> None:
    import email
    import io

    import pycdlib

    from pytest_ostimages.guest.seed import write_seed

    key = HostKey.generate()
    seed = tmp_path / "seed.iso"
    instance = write_seed(seed, "ost-suite-engine.ost.test", "192.0.2.10", "ssh-rsa AAAAroot", key,
                          {"runcmd": [["touch", "/root/x"]]})
    assert "LABEL=\"cidata\"" in subprocess.run(["blkid", str(seed)], capture_output=True, text=True).stdout
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    files = {}
    for name in ("meta-data", "user-data"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue().decode()
    iso.close()
    assert files["meta-data"] == f"instance-id: {instance}\nlocal-hostname: ost-suite-engine\n"
    parts = [p.get_payload() for p in email.message_from_string(files["user-data"]).get_payload()]
    assert len(parts) == 2 and all(p.startswith("#cloud-config\n") for p in parts)
    assert key.public in parts[0] and "ssh-rsa AAAAroot" in parts[0] and "ost-suite-engine.ost.test" in parts[0]
    assert '"hostname": "ost-suite-engine"' in parts[0]  # OST's VM name, as without cloud-init
    assert "/root/x" in parts[1]
    assert write_seed(tmp_path / "other.iso", "e", "192.0.2.10", "k", key) != instance


def test_cloud_init_is_read_from_the_layers_package_list(tmp_path: Path) -> None:
    from pytest_ostimages.images.catalog import Image

    pkglist = tmp_path / "pkglist.txt"
    pkglist.write_text("cloud-init-22.4.2-1+deb12u1\ncloud-initramfs-growroot-0.18\n")
    image = Image("d", "l", tmp_path / "x.qcow2", (), (), pkglist=pkglist)
    assert image.has_package("cloud-init")
    pkglist.write_text("cloud-initramfs-growroot-0.18\n")
    assert not image.has_package("cloud-init")
    assert not Image("d", "l", tmp_path / "x.qcow2", (), ()).has_package("cloud-init")
