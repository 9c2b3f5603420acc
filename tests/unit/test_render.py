"""XML rendering from the packaged templates and from a suite's own."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from lxml import etree

from pytest_ostimages.errors import OstError
from pytest_ostimages.owner import Label
from pytest_ostimages.render import HostEntry, Templates, domain_xml, network_xml

LABEL = Label("0a1b2c3d", 4242, "testhost", "/var/tmp/pytest-ostimages/0a1b2c3d", "engine")
SUBNET = ipaddress.IPv4Network("192.168.140.0/24")


def render_domain(templates: Templates, **overrides) -> etree._Element:
    args = dict(name="ost-0a1b2c3d-engine", virt_type="qemu", cpu_mode="maximum", memory_mib=768,
                vcpus=3, disk=Path("/w/engine.qcow2"),
                backing=[(Path("/i/l-engine.qcow2"), "qcow2"), (Path("/i/l-base.qcow2"), "qcow2")],
                network="ost-0a1b2c3d",
                mac="52:54:00:a8:8c:0a", console_log=Path("/w/engine.console.log"), label=LABEL)
    args.update(overrides)
    return etree.fromstring(domain_xml(templates.load("domain.xml"), **args))


def test_domain_gets_every_per_vm_value() -> None:
    root = render_domain(Templates())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "ost-0a1b2c3d-engine"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "768"
    assert root.findtext("vcpu") == "3"
    assert root.find("cpu").get("mode") == "maximum"
    assert root.find("devices/disk/source").get("file") == "/w/engine.qcow2"
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    # the installed chain is spelled out, with relabelling off for each layer
    chain = root.findall("devices/disk//backingStore/source")
    assert [s.get("file") for s in chain] == ["/i/l-engine.qcow2", "/i/l-base.qcow2"]
    assert all(s.find("seclabel").get("relabel") == "no" for s in chain)
    assert root.find("devices/disk/backingStore/backingStore/backingStore") is not None  # chain end
    assert root.find("devices/interface/source").get("network") == "ost-0a1b2c3d"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:a8:8c:0a"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == "/w/engine.console.log"


def test_metadata_label_round_trips() -> None:
    xml = etree.tostring(render_domain(Templates()), encoding="unicode")
    assert Label.from_xml(xml) == LABEL
    assert Label.from_xml("<domain><name>x</name></domain>") is None


def test_kvm_host_passthrough_and_default_cpu() -> None:
    root = render_domain(Templates(), virt_type="kvm", cpu_mode="host-passthrough")
    assert (root.get("type"), root.find("cpu").get("mode")) == ("kvm", "host-passthrough")
    assert render_domain(Templates(), cpu_mode="default").find("cpu") is None


def test_network_reserves_mac_ip_and_dns_names() -> None:
    hosts = [HostEntry("engine", "52:54:00:a8:8c:0a", SUBNET.network_address + 10),
             HostEntry("host0", "52:54:00:a8:8c:0b", SUBNET.network_address + 11)]
    root = etree.fromstring(network_xml(Templates().load("network.xml"), name="ost-0a1b2c3d",
                                        bridge="ost-0a1b2c3d", subnet=SUBNET, domain="lab.test",
                                        hosts=hosts, label=LABEL))
    assert root.findtext("name") == "ost-0a1b2c3d"
    assert root.find("bridge").get("name") == "ost-0a1b2c3d"
    assert root.find("domain").get("name") == "lab.test"
    ip = root.find("ip")
    assert (ip.get("address"), ip.get("prefix")) == ("192.168.140.1", "24")
    assert [(h.get("mac"), h.get("ip"), h.get("name")) for h in ip.findall("dhcp/host")] == [
        ("52:54:00:a8:8c:0a", "192.168.140.10", "engine"),
        ("52:54:00:a8:8c:0b", "192.168.140.11", "host0")]
    assert [h.findtext("hostname") for h in root.findall("dns/host")] == ["engine.lab.test", "host0.lab.test"]
    # reserved addresses stay out of the dynamic range
    assert ip.find("dhcp/range").get("start") == "192.168.140.100"
    assert Label.from_xml(etree.tostring(root, encoding="unicode")) == LABEL


def test_suite_template_overrides_the_packaged_one(tmp_path: Path) -> None:
    packaged = Templates().load("domain.xml")
    devices = packaged.find("devices")
    etree.SubElement(devices, "watchdog", model="i6300esb")
    (tmp_path / "domain.xml").write_bytes(etree.tostring(packaged))
    root = render_domain(Templates(tmp_path))
    assert root.find("devices/watchdog").get("model") == "i6300esb"
    # network.xml is not in the directory: the packaged one is used
    assert Templates(tmp_path).load("network.xml").find("forward").get("mode") == "nat"


def test_invalid_template_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "domain.xml").write_text("<domain><name>x</domain>")
    with pytest.raises(OstError, match=f"Template {tmp_path}/domain.xml is not valid XML"):
        Templates(tmp_path).load("domain.xml")


def test_template_without_disk_is_explained(tmp_path: Path) -> None:
    (tmp_path / "domain.xml").write_text("<domain><name>x</name><devices/></domain>")
    with pytest.raises(OstError, match="no <disk device='disk'>"):
        render_domain(Templates(tmp_path))


def test_missing_template_directory(tmp_path: Path) -> None:
    with pytest.raises(OstError, match="does not exist"):
        Templates(tmp_path / "nope")
