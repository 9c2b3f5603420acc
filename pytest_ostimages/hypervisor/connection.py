"""The libvirt connection: virt type, CPU mode, creating and removing networks and domains.

``libvirt`` is imported here and only when a connection is made, so that
``pytest --help`` and sessions without VMs work on hosts without the binding.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union
from urllib.parse import urlsplit

from .. import faults
from ..errors import VirtError
from .render import HostEntry, dhcp_host_xml, dns_host_xml

if TYPE_CHECKING:
    import libvirt

    from .host import AnyPath, Host

def libvirt_module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise VirtError(
            "The libvirt Python binding is not installed. Install it with "
            "'pip install libvirt-python' (needs libvirt's headers: libvirt-dev and "
            "pkg-config on Debian, libvirt-devel on Fedora/EL) or 'dnf install python3-libvirt'."
        ) from None
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str) -> "libvirt.virConnect":
    libvirt = libvirt_module()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VirtError(
            f"Cannot connect to libvirt at {uri}: {exc.get_error_message()}\n"
            f"Is the daemon running? Start it (systemctl start libvirtd, or 'libvirtd -d' "
            f"on hosts without systemd), check that you may use it (root or the libvirt "
            f"group), or choose another URI with --ost-libvirt-uri."
        ) from None


def libvirt_version(conn: "libvirt.virConnect") -> str:
    """The version of the libvirt `conn` talks to, e.g. "9.0.0"."""
    version = conn.getLibVersion()
    return f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"


def libvirt_error() -> Any:
    """libvirt.libvirtError (typed loosely: the binding is imported lazily)."""
    return libvirt_module().libvirtError


def resolve_virt_type(conn: "libvirt.virConnect", requested: str) -> str:
    """`requested` ("auto", "kvm", "qemu") -> the domain type to use."""
    if requested == "qemu":
        return "qemu"
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm")
        return "kvm"
    except libvirt_error() as exc:
        if requested == "kvm":
            raise VirtError(
                f"KVM was requested (--ost-virt-type=kvm) but libvirt at {conn.getURI()} "
                f"cannot use it: {exc.get_error_message()}\nEnable KVM (kvm module, "
                f"/dev/kvm access) or use --ost-virt-type=qemu to emulate (slow)."
            ) from None
        return "qemu"


def qemu_ids(conn: "libvirt.virConnect", virt_type: str) -> Optional[tuple[int, int]]:
    """The uid and gid libvirt runs `virt_type` guests as (its DAC security model's base label), None if
    it does not say (libvirt's test driver, a driver without DAC)."""
    from lxml import etree

    try:
        caps = etree.fromstring(conn.getCapabilities().encode())
    except libvirt_error():
        return None
    label = caps.findtext(f"host/secmodel[model='dac']/baselabel[@type='{virt_type}']") or ""
    found = re.fullmatch(r"\+?(\d+):\+?(\d+)", label.strip())
    return (int(found.group(1)), int(found.group(2))) if found else None


def firmware_choices(conn: "libvirt.virConnect", virt_type: str, machine: str) -> Optional[list[str]]:
    """The firmware kinds libvirt can give a `machine` domain ("efi", "bios"); None if it cannot say."""
    try:
        capabilities = conn.getDomainCapabilities(None, "x86_64", machine or None, virt_type)
    except libvirt_error():
        return None
    from lxml import etree

    return [value.text or "" for value in etree.fromstring(capabilities.encode()).findall(
        "os/enum[@name='firmware']/value")]


def resolve_cpu_mode(virt_type: str, requested: str) -> str:
    if requested != "auto":
        return requested
    # Under TCG "maximum" gives the guest every emulated feature; EL9 needs x86-64-v2.
    return "host-passthrough" if virt_type == "kvm" else "maximum"


# --- objects ----------------------------------------------------------------------


def create_network(conn: "libvirt.virConnect", xml: str) -> "libvirt.virNetwork":
    return _define_and_start(conn, xml, conn.networkDefineXML, "network")


def add_network_host(net: "libvirt.virNetwork", entry: HostEntry, domain: Optional[str]) -> None:
    """Reserve `entry` on a running network (DHCP per family and, given a `domain`, DNS),
    live and in its config."""
    libvirt = libvirt_module()
    flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
    add = libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST
    try:
        # the <ip> elements in order: IPv4 (when the network has it), then IPv6
        for index, (version, ip) in enumerate((v, ip) for v, ip in ((4, entry.ip), (6, entry.ip6)) if ip):
            net.update(add, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, index, dhcp_host_xml(entry, version), flags)
            if domain is not None:
                net.update(add, libvirt.VIR_NETWORK_SECTION_DNS_HOST, -1, dns_host_xml(entry, domain, ip), flags)
    except libvirt.libvirtError as exc:
        raise VirtError(f"Cannot add {entry.name} ({entry.mac} -> {', '.join(map(str, entry.addresses))}) "
                        f"to network {net.name()}: {exc.get_error_message()}") from None


def create_domain(conn: "libvirt.virConnect", xml: str) -> "libvirt.virDomain":
    return _define_and_start(conn, xml, conn.defineXML, "domain")


def _define_and_start(conn: "libvirt.virConnect", xml: str, define: Callable[[str], Any], kind: str) -> Any:
    """Define and start a network or domain; nothing is left defined if starting fails.

    The object removed after a failed start is the very one just defined (its
    handle, not a name looked up again).
    """
    libvirt = libvirt_module()
    try:
        obj = define(xml)
        faults.point(f"{kind}-defined")
    except libvirt.libvirtError as exc:
        raise VirtError(f"libvirt refused the {kind} definition: {exc.get_error_message()}\n"
                        f"Check your {kind}.xml template.") from None
    try:
        obj.create()
        faults.point(f"{kind}-started")
    except libvirt.libvirtError as exc:
        remove(obj)
        message = exc.get_error_message()
        hint = ("\nlibvirt's qemu user must be able to read every image of the chain and traverse "
                "their directories (ost-images installs them 0444 under a 0755 directory)."
                if "Permission denied" in message else f"\n{KVM_HINT}" if KVM_FAILURE.search(message) else "")
        raise VirtError(f"Cannot start {kind} {obj.name()}: {message}{hint}") from None
    except BaseException:  # interrupted: leave nothing behind
        remove(obj)
        raise
    return obj


def remove(obj: Union["libvirt.virDomain", "libvirt.virNetwork"]) -> None:
    """Destroy and undefine a domain or network: the handle itself, never a name looked up again.

    Only the ledger (state/ledger.py, which checks the owner label first), a failed start
    or restore of the object just made, and a lab replacing its own running domain by a
    restored one of the same name call this.
    """
    libvirt = libvirt_module()
    with contextlib.suppress(libvirt.libvirtError):
        if obj.isActive():
            obj.destroy()
    if isinstance(obj, libvirt.virDomain):
        with contextlib.suppress(libvirt.libvirtError):
            obj.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            return
    with contextlib.suppress(libvirt.libvirtError):  # a network, or a driver without those flags
        obj.undefine()


# What QEMU logs when KVM cannot run a guest it started (nested or paravirtualized hosts: the
# guest stops at once, paused), or cannot even set the CPU up for it.
KVM_FAILURE = re.compile(r"KVM internal error.*|emulation failure.*|failed to set MSR.*|kvm_.*Assertion.*")
KVM_HINT = ("This host's KVM cannot run the guest (common on nested or paravirtualized hosts). Run the VMs under "
            "emulation with --ost-virt-type=qemu (slower), or fix KVM on the host.")


def qemu_log(dom: "libvirt.virDomain", host: "Host") -> Optional["AnyPath"]:
    """libvirt's log of a domain's QEMU, on the hypervisor `host` (a system daemon's, or this user's)."""
    parts = urlsplit(dom.connect().getURI())
    if not parts.scheme.startswith("qemu"):
        return None
    if parts.path == "/system":
        return host.path(f"/var/log/libvirt/qemu/{dom.name()}.log")
    return host.path(str(Path.home() / ".cache" / "libvirt" / "qemu" / "log" / f"{dom.name()}.log")) \
        if host.local else None


def kvm_failure(dom: "libvirt.virDomain", host: "Host") -> Optional[str]:
    """Why KVM stopped the domain, quoting libvirt's log of it, with what to do; None if it did not."""
    log = qemu_log(dom, host)
    try:
        lines = log.read_text(errors="replace").splitlines()[-200:] if log is not None else []
    except OSError:
        return None
    said = list(dict.fromkeys(m.group(0).strip() for line in lines if (m := KVM_FAILURE.search(line))))
    if not said:
        return None
    return f"libvirt's log of it ({log}) says {' / '.join(repr(line) for line in said[:3])}. {KVM_HINT}"


STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
          5: "shut off", 6: "crashed", 7: "suspended (PM)"}


SHUT_OFF, SHUTOFF_CRASHED = 5, 3  # libvirt's VIR_DOMAIN_SHUTOFF and its reason VIR_DOMAIN_SHUTOFF_CRASHED


def domain_state(dom: "libvirt.virDomain") -> str:
    try:
        state, reason = dom.state()
    except libvirt_error():
        return "gone (undefined)"
    if (state, reason) == (SHUT_OFF, SHUTOFF_CRASHED):
        return "shut off: its qemu process crashed"
    return STATES.get(state, f"state {state}")


def qemu_crashed(dom: "libvirt.virDomain") -> bool:
    """Whether the domain stopped because its qemu process died (a signal, an abort)."""
    try:
        return tuple(dom.state()) == (SHUT_OFF, SHUTOFF_CRASHED)
    except libvirt_error():
        return False


def qemu_crash(dom: "libvirt.virDomain", host: "Host") -> Optional[str]:
    """Where to read why the domain's qemu process crashed; None if it did not."""
    if not qemu_crashed(dom):
        return None
    log = qemu_log(dom, host)
    return (f"libvirt's log of it{f' ({log})' if log is not None else ''} ends where qemu died, and the "
            f"hypervisor's kernel log (dmesg) names a fault of qemu-system-* if it was one. The image is not "
            f"the cause: the hypervisor's qemu is")
