"""Firmware: told from an image's partition table (real qemu-img images made with sfdisk), and
what a UEFI domain gets (rendered from the packaged template)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lxml import etree

from pytest_ostimages.errors import ImageError, OstError
from pytest_ostimages.hypervisor.render import Templates
from pytest_ostimages.images.firmware import detect

from .conftest import qemu_img
from .test_render import render_domain

GPT_ESP = "label: gpt\nsize=8MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=linux\n"  # as kiwi's
GPT_PLAIN = "label: gpt\ntype=linux\n"
MBR = "label: dos\ntype=83, bootable\n"


def image(tmp_path: Path, table: str = "", boot_code: bool = False) -> Path:
    raw, qcow2 = tmp_path / "disk.raw", tmp_path / "disk.qcow2"
    subprocess.run(["truncate", "-s", "32M", str(raw)], check=True)
    if table:
        subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)], input=table, text=True,
                       check=True, capture_output=True)
    if boot_code:  # what extlinux's or GRUB's MBR code puts in the first 440 bytes
        with raw.open("r+b") as disk:
            disk.write(b"\xfa\x31\xc0" * 100)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return qcow2


def test_a_gpt_with_an_efi_system_partition_and_no_boot_code_is_uefi(tmp_path: Path) -> None:
    assert detect(image(tmp_path, GPT_ESP)) == "efi"


def test_an_overlay_is_told_by_its_chain(tmp_path: Path) -> None:
    base = image(tmp_path, GPT_ESP)
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay))
    assert detect(overlay) == "efi"


def test_an_mbr_with_boot_code_is_bios(tmp_path: Path) -> None:
    assert detect(image(tmp_path, MBR, boot_code=True)) == "bios"


def test_a_hybrid_gpt_with_boot_code_boots_with_bios(tmp_path: Path) -> None:
    assert detect(image(tmp_path, GPT_ESP, boot_code=True)) == "bios"


@pytest.mark.parametrize("table, why", [
    ("", "it has no partition table"),
    (GPT_PLAIN, "its GPT has neither an EFI System Partition nor a BIOS boot partition"),
    (MBR, "its MBR has no boot code and no EFI System Partition (partition types 0x83)"),
])
def test_an_image_of_neither_kind_is_an_error_that_says_to_choose(tmp_path: Path, table: str, why: str) -> None:
    path = image(tmp_path, table)
    with pytest.raises(ImageError, match="--ost-firmware=bios or --ost-firmware=efi") as error:
        detect(path)
    assert f"Cannot tell whether image {path} boots with BIOS or UEFI: {why}" in str(error.value)


def test_a_uefi_domain_uses_firmware_auto_selection_with_its_nvram_in_the_work_directory() -> None:
    root = render_domain(Templates(), firmware="efi", nvram=Path("/w/engine.nvram"))
    os_node = root.find("os")
    assert os_node.get("firmware") == "efi" and os_node.findtext("nvram") == "/w/engine.nvram"
    assert os_node.find("firmware/feature[@name='secure-boot']").get("enabled") == "no"  # signed and unsigned boot
    assert "q35" in os_node.find("type").get("machine")
    # NIC N on PCIe root port N: the guest names it enpNs0
    buses = [iface.find("address").get("bus") for iface in root.findall("devices/interface")]
    assert buses == ["0x01"]


def test_secure_boot_enrols_the_keys_and_needs_q35(tmp_path: Path) -> None:
    root = render_domain(Templates(), firmware="efi", secure_boot=True)
    assert root.find("os/firmware/feature[@name='enrolled-keys']").get("enabled") == "yes"
    assert root.find("features/smm").get("state") == "on"
    template = etree.fromstring(etree.tostring(Templates().load("domain.xml")))  # a copy, made a pc machine
    template.find("os/type").set("machine", "pc")
    (tmp_path / "domain.xml").write_bytes(etree.tostring(template))
    with pytest.raises(OstError, match="Secure Boot .*needs a q35 machine; the domain template's is pc"):
        render_domain(Templates(tmp_path), firmware="efi", secure_boot=True)


def test_a_bios_domain_has_no_firmware_element() -> None:
    os_node = render_domain(Templates()).find("os")
    assert os_node.get("firmware") is None and os_node.find("nvram") is None
