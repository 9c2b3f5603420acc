"""XML rendering from the packaged templates and from a suite's own."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from lxml import etree

from pytest_ostimages.errors import OstError
from pytest_ostimages.state.owner import Label
from pytest_ostimages.hypervisor.render import HostEntry, OstMetadata, Templates, domain_xml, network_xml

LABEL = Label("0a1b2c3d", 4242, "testhost", "/var/tmp/pytest-ostimages/0a1b2c3d", "engine")
SUBNET = ipaddress.IPv4Network("192.168.140.0/24")


def render_domain(templates: Templates, **overrides) -> etree._Element:
    args = dict(name="ost-0a1b2c3d-engine", virt_type="qemu", cpu_mode="maximum", memory_mib=768,
                vcpus=3, disk=Path("/w/engine.qcow2"),
                backing=[(Path("/i/l-engine.qcow2"), "qcow2"), (Path("/i/l-base.qcow2"), "qcow2")],
                nics=[("ost-0a1b2c3d", "52:54:00:a8:8c:0a")], console_log=Path("/w/engine.console.log"), label=LABEL)
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
    assert (ip.get("address"), ip.get("netmask")) == ("192.168.140.1", "255.255.255.0")
    assert [(h.get("mac"), h.get("ip"), h.get("name")) for h in ip.findall("dhcp/host")] == [
        ("52:54:00:a8:8c:0a", "192.168.140.10", "engine"),
        ("52:54:00:a8:8c:0b", "192.168.140.11", "host0")]
    assert [h.findtext("hostname") for h in root.findall("dns/host")] == ["engine.lab.test", "host0.lab.test"]
    # reserved addresses stay out of the dynamic range
    assert ip.find("dhcp/range").get("start") == "192.168.140.100"
    assert Label.from_xml(etree.tostring(root, encoding="unicode")) == LABEL
    assert root.find("ip[@family='ipv6']") is None


def test_dual_stack_network_reserves_both_families_by_mac_and_duid() -> None:
    subnet6 = ipaddress.IPv6Network("fd6f:7374:c0a8:8c00::/64")
    hosts = [HostEntry("engine", "52:54:00:a8:8c:0a", SUBNET.network_address + 10, subnet6.network_address + 10)]
    root = etree.fromstring(network_xml(Templates().load("network.xml"), name="n", bridge="n", subnet=SUBNET,
                                        subnet6=subnet6, domain="lab.test", hosts=hosts, label=LABEL))
    ip4, ip6 = root.findall("ip")
    assert ip4.get("family") is None and ip4.find("dhcp/host").get("mac") == "52:54:00:a8:8c:0a"
    assert (ip6.get("family"), ip6.get("address"), ip6.get("prefix")) == ("ipv6", "fd6f:7374:c0a8:8c00::1", "64")
    # DHCPv6 is keyed on the DUID-LL of the MAC, as OST writes it
    assert ip6.find("dhcp/host").attrib == {"id": "0:3:0:1:52:54:00:a8:8c:0a", "ip": "fd6f:7374:c0a8:8c00::a",
                                            "name": "engine"}
    assert ip6.find("dhcp/range").get("start") == "fd6f:7374:c0a8:8c00::100"
    assert [h.get("ip") for h in root.findall("dns/host")] == ["192.168.140.10", "fd6f:7374:c0a8:8c00::a"]
    only6 = etree.fromstring(network_xml(Templates().load("network.xml"), name="n", bridge="n", subnet=None,
                                         subnet6=subnet6, domain="d", hosts=[], label=LABEL))
    assert [ip.get("family") for ip in only6.findall("ip")] == ["ipv6"]


def test_other_networks_have_no_dns_and_carry_ost_metadata() -> None:
    ost = OstMetadata(Path("/deploy"), network_role="storage")
    root = etree.fromstring(network_xml(Templates().load("network.xml"), name="n", bridge="n", subnet=SUBNET,
                                        domain="d", hosts=[HostEntry("s", "52:54:00:a8:8c:0a", SUBNET[10])],
                                        label=LABEL, dns=False, ost=ost))
    assert root.find("dns").attrib == {"enable": "no"} and not list(root.find("dns"))
    # where ost_utils/backend/virsh/networking.py looks
    meta = root.find("metadata/{OST:metadata}ost")
    assert meta.find("ost-network-role").get("comment") == "storage"
    assert meta.find("ost-working-dir").get("comment") == "/deploy"


def test_several_nics_extra_disks_and_ost_metadata_of_a_domain() -> None:
    root = render_domain(Templates(), nics=[("net-a", "52:54:00:00:00:01"), ("net-b", "52:54:00:00:00:02")],
                         disks=[(Path("/w/sda.raw"), "sda", "2"), (Path("/w/sdb.raw"), "sdb", "3")],
                         ost=OstMetadata(Path("/deploy"), deploy_scripts=("common/a.sh", "common/b.sh")))
    nics = root.findall("devices/interface")
    assert [(n.find("source").get("network"), n.find("mac").get("address")) for n in nics] == [
        ("net-a", "52:54:00:00:00:01"), ("net-b", "52:54:00:00:00:02")]
    assert all(n.find("model").get("type") == "virtio" for n in nics)  # copies of the template's
    disks = root.findall("devices/disk[target]")
    assert [(d.find("source").get("file"), d.find("target").get("dev"), d.find("target").get("bus"),
             d.findtext("serial")) for d in disks[1:]] == [("/w/sda.raw", "sda", "scsi", "2"),
                                                          ("/w/sdb.raw", "sdb", "scsi", "3")]
    assert root.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    meta = root.find("metadata/{OST:metadata}ost")
    assert meta.find("ost-working-dir").get("comment") == "/deploy"
    assert [s.get("name") for s in meta.findall("ost-deploy-scripts/script")] == ["common/a.sh", "common/b.sh"]


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


def test_guests_never_resolve_the_hosts_etc_hosts() -> None:
    # libvirt's dnsmasq reads the host's /etc/hosts unless told not to: a VM named like the
    # host (e.g. "vm") resolved to 127.0.0.1 on a machine whose /etc/hosts maps its name so
    root = etree.fromstring(network_xml(Templates().load("network.xml"), name="n", bridge="n", subnet=SUBNET,
                                        domain="d", hosts=[], label=LABEL))
    ns = "{http://libvirt.org/schemas/network/dnsmasq/1.0}"
    assert [o.get("value") for o in root.findall(f"{ns}options/{ns}option")] == ["no-hosts"]


def test_dhcpv6_gives_the_search_domain_where_dns_names_are() -> None:
    # a guest's DHCPv6 client may write its resolver last, from its own lease (Debian's dhclient-script):
    # without the search domain there, short names stopped resolving, one run in a few
    ns = "{http://libvirt.org/schemas/network/dnsmasq/1.0}"
    for dns, expected in ((True, ["no-hosts", "dhcp-option=option6:domain-search,ost.test"]), (False, ["no-hosts"])):
        root = etree.fromstring(network_xml(Templates().load("network.xml"), name="n", bridge="n", subnet=SUBNET,
                                            subnet6=ipaddress.IPv6Network("fd00:1::/64"), domain="ost.test",
                                            hosts=[], label=LABEL, dns=dns))
        assert [o.get("value") for o in root.findall(f"{ns}options/{ns}option")] == expected
