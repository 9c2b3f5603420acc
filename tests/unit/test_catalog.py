"""The image catalog: discovery from RPM and directory, layers, chains, keys."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pytest_ostimages.images.catalog import Catalog
from pytest_ostimages.errors import ImageError

DISTRO = "testos"


def test_directory_scan_finds_layers_keys_and_pkglists(images_dir: Path) -> None:
    catalog = Catalog.discover(images_dir, rpm=("rpm", "--dbpath", "/nonexistent-db"))
    assert catalog.source == "directory"
    assert catalog.distros() == [DISTRO]
    assert catalog.layer_names(DISTRO) == ["base", "engine-installed", "he-installed", "host-installed"]
    assert catalog.ssh_key(DISTRO) == images_dir / f"{DISTRO}_id_rsa"
    engine = catalog.image(DISTRO, "engine-installed")
    assert engine.pkglist == images_dir / f"{DISTRO}-engine-installed-pkglist.txt"
    assert engine.pkglist_diff == images_dir / f"{DISTRO}-engine-installed-pkglist-diff.txt"


def test_backing_chain_resolves_relative_names_in_the_image_directory(images_dir: Path) -> None:
    he = Catalog.discover(images_dir).image(DISTRO, "he-installed")
    assert he.chain == (images_dir / f"{DISTRO}-he-installed.qcow2",
                        images_dir / f"{DISTRO}-host-installed.qcow2",
                        images_dir / f"{DISTRO}-base.qcow2")


def test_rpm_database_is_preferred_and_gives_package_versions(images_dir: Path, rpm_db) -> None:
    rpm = rpm_db(f"ost-images-{DISTRO}-base",
                 [images_dir / f"{DISTRO}-base.qcow2", images_dir / f"{DISTRO}_id_rsa"])
    rpm_db(f"ost-images-{DISTRO}-engine-installed", [images_dir / f"{DISTRO}-engine-installed.qcow2"])
    catalog = Catalog.discover(images_dir, rpm=rpm)
    assert catalog.source == "rpm"
    # host-installed is on disk but no package owns it: the RPM view does not list it
    assert catalog.layer_names(DISTRO) == ["base", "engine-installed"]
    image = catalog.image(DISTRO, "engine-installed")
    assert image.package is not None
    assert (image.package.name, image.package.version) == (f"ost-images-{DISTRO}-engine-installed", "1.0-7")


def test_file_listed_by_a_package_but_missing_says_reinstall(images_dir: Path, rpm_db) -> None:
    gone = images_dir / f"{DISTRO}-storage-installed.qcow2"
    rpm = rpm_db(f"ost-images-{DISTRO}-storage-installed", [gone, images_dir / f"{DISTRO}-base.qcow2"])
    with pytest.raises(ImageError, match=f"lists {gone}, but the file is missing.*dnf reinstall "
                                         f"ost-images-{DISTRO}-storage-installed"):
        Catalog.discover(images_dir, rpm=rpm).image(DISTRO, "storage-installed")


def test_unknown_layer_lists_the_installed_ones(images_dir: Path) -> None:
    with pytest.raises(ImageError) as err:
        Catalog.discover(images_dir).image(DISTRO, "storage-installed")
    message = str(err.value)
    assert "Layer 'storage-installed' of testos is not installed" in message
    assert "base, engine-installed, he-installed, host-installed" in message


def test_unknown_distro_lists_the_installed_ones(images_dir: Path) -> None:
    with pytest.raises(ImageError, match=r"Distro 'el9stream' is not installed(.|\n)*testos: base"):
        Catalog.discover(images_dir).choose_distro("el9stream")


def test_several_distros_need_a_choice(images_dir: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images_dir / "other-base.qcow2"), "1M"],
                   check=True)
    catalog = Catalog.discover(images_dir)
    with pytest.raises(ImageError, match="Several distros.*--ost-distro"):
        catalog.choose_distro(None)
    assert catalog.choose_distro("other") == "other"


def test_no_images_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="(?s)No ost-images are installed.*dnf install"):
        Catalog.discover(tmp_path / "empty").choose_distro(None)


def test_missing_backing_file_is_a_broken_chain(images_dir: Path) -> None:
    base = images_dir / f"{DISTRO}-base.qcow2"
    base.unlink()
    with pytest.raises(ImageError) as err:
        Catalog.discover(images_dir).image(DISTRO, "engine-installed")
    assert f"backing chain is broken: its backing file {base} does not exist" in str(err.value)
    assert str(base) in str(err.value)


def test_image_too_short_to_open_is_rejected(images_dir: Path) -> None:
    path = images_dir / f"{DISTRO}-base.qcow2"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:100])  # not even the header: qemu-img info fails
    with pytest.raises(ImageError, match="cannot be used: qemu-img cannot open it"):
        Catalog.discover(images_dir).image(DISTRO, "base")


def test_damaged_image_that_opens_is_caught_by_qemu_img_check(images_dir: Path) -> None:
    path = images_dir / f"{DISTRO}-base.qcow2"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:120])  # the header survives: qemu-img info accepts it
    subprocess.run(["qemu-img", "info", "-U", str(path)], check=True, capture_output=True)
    with pytest.raises(ImageError, match=r"damaged or truncated \(qemu-img check finds [1-9]"):
        Catalog.discover(images_dir).image(DISTRO, "base")


def test_raw_file_named_qcow2_is_rejected(images_dir: Path) -> None:
    path = images_dir / f"{DISTRO}-base.qcow2"
    path.chmod(0o644)
    path.write_bytes(b"\0" * 65536)
    with pytest.raises(ImageError, match="not a qcow2 image.*'raw'"):
        Catalog.discover(images_dir).image(DISTRO, "base")


def test_missing_key_names_the_expected_file_and_package(images_dir: Path) -> None:
    (images_dir / f"{DISTRO}_id_rsa").unlink()
    catalog = Catalog.discover(images_dir)
    with pytest.raises(ImageError, match=f"expected {images_dir}/{DISTRO}_id_rsa.*ost-images-{DISTRO}-base"):
        catalog.ssh_key(DISTRO)


def test_image_given_as_a_path(images_dir: Path, tmp_path: Path) -> None:
    catalog = Catalog.discover(images_dir)
    image = catalog.image_from_path(images_dir / f"{DISTRO}-host-installed.qcow2", DISTRO)
    assert (image.distro, image.layer) == (DISTRO, "host-installed")
    assert len(image.chain) == 2
    with pytest.raises(ImageError, match="does not exist"):
        catalog.image_from_path(tmp_path / "nope.qcow2", DISTRO)


def test_custom_layer_squash_flattens_the_chain(images_dir: Path, tmp_path: Path) -> None:
    from pytest_ostimages.layers import _store

    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(images_dir / f"{DISTRO}-he-installed.qcow2"), str(overlay)], check=True)
    kept, flat = tmp_path / "kept.qcow2", tmp_path / "flat.qcow2"
    qemu = (os.getuid() + 1, os.getgid())  # qemu's user reads layers through its group
    _store(overlay, kept, depth=4, squash_above=None, qemu=qemu)  # moved as it is: still an overlay
    assert len(Catalog.discover(images_dir).image_from_path(kept, DISTRO).chain) == 4
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(images_dir / f"{DISTRO}-he-installed.qcow2"), str(overlay)], check=True)
    _store(overlay, flat, depth=4, squash_above=2, qemu=qemu)
    assert Catalog.discover(images_dir).image_from_path(flat, DISTRO).chain == (flat,)
    for layer in (kept, flat):  # what the build put into the guest: for qemu's group only
        assert (oct(layer.stat().st_mode & 0o777), layer.stat().st_gid) == ("0o640", os.getgid())


def test_missing_backing_file_is_named_on_the_rpm_path_too(images_dir: Path, rpm_db) -> None:
    base = images_dir / f"{DISTRO}-base.qcow2"
    rpm = rpm_db(f"ost-images-{DISTRO}-base", [base, images_dir / f"{DISTRO}_id_rsa"])
    rpm_db(f"ost-images-{DISTRO}-engine-installed", [images_dir / f"{DISTRO}-engine-installed.qcow2"])
    base.unlink()
    catalog = Catalog.discover(images_dir, rpm=rpm)
    assert catalog.layer_names(DISTRO) == ["engine-installed"]
    with pytest.raises(ImageError) as err:
        catalog.image(DISTRO, "engine-installed")
    message = str(err.value)
    assert "is not installed" not in message
    assert f"backing chain is broken: its backing file {base} does not exist" in message
    assert f"ost-images-{DISTRO}-engine-installed-1.0-7" in message


def test_the_report_header_tells_whole_images_from_overlays(images_dir: Path) -> None:
    from pytest_ostimages.config import OstConfig
    from pytest_ostimages.report import header_lines

    lines = header_lines(OstConfig(images_dir=images_dir, libvirt_uri="test:///default"), Catalog.discover(images_dir))
    assert f"ost-images:   {DISTRO}-base (no package, whole image)" in lines
    assert f"ost-images:   {DISTRO}-he-installed (no package, on {DISTRO}-host-installed.qcow2)" in lines
