"""All settings of the plugin, resolved once into a typed :class:`OstConfig`.

Every setting ``x_y`` exists as the command-line flag ``--ost-x-y``, the ini key
``ost_x_y`` and the environment variable ``OST_X_Y``. Precedence: factory argument
> command line > ini file > environment > default. Values are parsed by one parser
per setting, whatever their source, so a bad value gets the same message everywhere.
"""

from __future__ import annotations

import ipaddress
import math
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pytest

VIRT_TYPES = ("auto", "kvm", "qemu")
INSIDE_SHARES = ("auto", "virtiofs", "copy")
IDENTITIES = ("auto", "keep")
CLOUD_INIT = ("auto", "on", "off")
CPU_MODES = ("auto", "host-passthrough", "host-model", "maximum", "default")
IP_VERSIONS = ("4", "6", "both")
FIRMWARES = ("auto", "bios", "efi")
SUITE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # an OST suite's, as in basic-suite-master


@dataclass(frozen=True)
class PerRole:
    """A number that may differ per VM role, e.g. ``--ost-memory=1024,engine=4096``.

    Roles are looked up by kind: ``host0`` and ``host1`` use the ``host`` entry.
    """

    default: int
    roles: Mapping[str, int] = field(default_factory=dict)

    def for_role(self, role: str) -> int:
        return self.roles.get(role, self.roles.get(role_kind(role), self.default))


def default_workdir() -> Path:
    """``/var/tmp/pytest-ostimages-<user>``: every user a work root of their own (their runs, kept VMs
    and saved states), traversable by libvirt's qemu user."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        user = str(os.getuid())
    return Path(f"/var/tmp/pytest-ostimages-{user}")


def role_kind(role: str) -> str:
    """A role's family: ``host0`` and ``host-1`` are ``host``; an unnumbered role is its own."""
    return role.rstrip("0123456789-_") or role


@dataclass(frozen=True)
class OstConfig:
    """The resolved settings of one pytest session."""

    images_dir: Path = Path("/usr/share/ost-images")
    distro: Optional[str] = None
    image: Optional[str] = None
    libvirt_uri: str = "qemu:///system"  # where this session's VMs run (one of `hypervisors`)
    hypervisors: tuple[str, ...] = ("qemu:///system",)  # every URI given: sessions and workers are placed on them
    virt_type: str = "auto"
    cpu_mode: str = "auto"
    memory: PerRole = PerRole(2048, {"engine": 4096})
    vcpus: PerRole = PerRole(2)
    hosts: int = 2
    boot_timeout: float = 600.0
    workdir: Path = field(default_factory=default_workdir)
    keep: bool = False
    templates: Optional[Path] = None
    subnet_pool: ipaddress.IPv4Network = ipaddress.IPv4Network("192.168.128.0/17")
    dns_domain: str = "ost.test"
    artifacts: Optional[Path] = None
    share: bool = False
    max_boots: Optional[int] = None  # None: one more than the CPUs
    reuse: bool = False
    identity: str = "auto"
    cloud_init: str = "auto"
    warm: bool = True
    warm_dir: Optional[Path] = None  # the saved states; None: <workdir>/warm
    warm_cache_size: int = 20  # GiB
    run_inside: Optional[str] = None  # a layer: run the session's tests inside a VM of it
    inside_setup: Optional[Path] = None
    inside_share: str = "auto"
    inside_artifacts: tuple[str, ...] = ()
    init_config: Optional[Path] = None  # an OST init-config: boot its topology at session start
    suite: Optional[str] = None  # OST suite name (default: the init-config's directory)
    root: Optional[Path] = None  # OST_REPO_ROOT: deploy scripts are relative to it (default rootdir)
    ip_version: str = "both"  # addresses of every network: IPv4, IPv6 or both
    deploy_timeout: float = 1800.0  # seconds each OST deploy script may run
    firmware: str = "auto"  # auto: per image, from its partition table
    secure_boot: bool = False  # UEFI guests: the firmware with Secure Boot (and Microsoft's keys)
    given: frozenset[str] = frozenset()  # the settings given explicitly (not defaults)

    def ip_versions(self) -> tuple[int, ...]:
        return {"4": (4,), "6": (6,), "both": (4, 6)}[self.ip_version]

    @property
    def warm_root(self) -> Path:
        """Where warm start's saved states are."""
        return self.warm_dir if self.warm_dir is not None else self.workdir / "warm"


# --- parsers: str -> value, raising ValueError with what was expected -------------


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("expected a whole number, e.g. 2") from None
    if value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds, e.g. 600") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a number of seconds greater than 0, e.g. 600")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    return parse


def _per_role(raw: str) -> PerRole:
    """``1024`` or ``1024,engine=4096,host=2048`` (a bare number is the default)."""
    default: Optional[int] = None
    roles: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        role, sep, number = part.rpartition("=")
        if sep and not role:
            raise ValueError(f"{part!r} has no role before '='")
        try:
            value = int(number)
        except ValueError:
            raise ValueError(
                f"{part!r} is not a number; expected e.g. '1024' or '1024,engine=4096'"
            ) from None
        if value <= 0:
            raise ValueError(f"{part!r} must be greater than 0")
        if role:
            roles[role] = value
        else:
            default = value
    if default is None and not roles:
        raise ValueError("expected e.g. '1024' or '1024,engine=4096'")
    return PerRole(default if default is not None else 0, roles)


def _max_boots(raw: str) -> Optional[int]:
    if raw.strip() == "auto":
        return None
    try:
        return _positive_int(raw)
    except ValueError:
        raise ValueError("expected 'auto' (CPUs + 1), 0 (no limit) or a number of VMs") from None


def _uris(raw: str) -> tuple[str, ...]:
    """One libvirt URI, or several, comma- (or, in an ini file, line-) separated."""
    uris = tuple(dict.fromkeys(u for u in re.split(r"[,\s]+", raw) if u))
    if not uris:
        raise ValueError("expected a libvirt URI, e.g. qemu:///system or qemu+ssh://root@host/system")
    bad = [u for u in uris if "://" not in u]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a libvirt URI, e.g. qemu:///system or qemu+ssh://root@host/system")
    return uris


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _absolute_path(raw: str) -> Path:
    path = _path(raw)
    if not path.is_absolute():
        raise ValueError("expected an absolute path (libvirt's qemu user opens the files in it), "
                         "e.g. /var/tmp/pytest-ostimages-me")
    return path


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _subnet_pool(raw: str) -> ipaddress.IPv4Network:
    try:
        pool = ipaddress.IPv4Network(raw)
    except ValueError as exc:
        raise ValueError(f"expected an IPv4 network such as 192.168.128.0/17 ({exc})") from None
    if pool.prefixlen > 24:
        raise ValueError("expected a prefix of /24 or larger: networks are allocated as /24s")
    return pool


def _guest_paths(raw: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not all(p.startswith("/") for p in paths):
        raise ValueError("expected absolute paths in the guest, comma-separated, e.g. /var/log/vdsm,/tmp/out")
    return paths


def _suite(raw: str) -> str:
    if not SUITE_NAME.fullmatch(raw):
        raise ValueError("expected a suite name of letters, digits, '-' and '_', e.g. basic-suite-master")
    return raw


DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123


def _dns_domain(raw: str) -> str:
    domain = raw.strip(".")
    bad = [label for label in domain.split(".") if not DNS_LABEL.fullmatch(label)]
    if bad or len(domain) > 253:
        raise ValueError(f"expected a DNS domain such as ost.test: labels of letters, digits and '-', not "
                         f"starting or ending with '-', at most 63 characters ({', '.join(map(repr, bad)) or 'too long'})")
    return domain


@dataclass(frozen=True)
class Setting:
    """One setting: its name, parser and help. Flags/ini/env names derive from it."""

    name: str
    parse: Callable[[str], Any]
    help: str
    flag: bool = False
    env_name: Optional[str] = None  # when not OST_<NAME> (a variable OST itself uses)

    @property
    def option(self) -> str:
        return "--ost-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "ost_" + self.name

    @property
    def env(self) -> str:
        return self.env_name or "OST_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("images_dir", _path, "directory of installed ost-images (default /usr/share/ost-images)"),
    Setting("distro", str, "distro of the images to use (default: the only one installed)"),
    Setting("image", str, "layer (e.g. engine-installed) or qcow2 path for the ost_vm fixture"),
    Setting("libvirt_uri", _uris, "libvirt connection URI, or several (comma-separated; an ini list): the "
            "hypervisors sessions and xdist workers are placed on, by free capacity (default qemu:///system)"),
    Setting("virt_type", _choice(VIRT_TYPES),
            "auto, kvm or qemu (TCG emulation); auto uses kvm when libvirt offers it"),
    Setting("cpu_mode", _choice(CPU_MODES), "guest CPU: auto (host-passthrough on kvm, maximum on qemu), "
            "host-passthrough, host-model, maximum or default"),
    Setting("memory", _per_role, "guest memory in MiB, per role: '2048,engine=4096'"),
    Setting("vcpus", _per_role, "guest vCPUs, per role: '2' or '2,engine=4'"),
    Setting("hosts", _positive_int, "number of VMs in the hosts fixture (default 2)"),
    Setting("max_boots", _max_boots, "how many VMs may boot at once on this host, across all "
            "sessions and workers: auto (CPUs + 1, the default), 0 (no limit) or a number"),
    Setting("boot_timeout", _seconds, "seconds a VM has to answer SSH and be ready (default 600)"),
    Setting("workdir", _absolute_path, "where session work directories are made, one root per user; must be "
            "traversable by libvirt's qemu user (default /var/tmp/pytest-ostimages-<user>)"),
    Setting("keep", _bool, "keep the work directory (overlays, console logs) after the session", flag=True),
    Setting("templates", _path, "directory with your own domain.xml / network.xml templates"),
    Setting("subnet_pool", _subnet_pool, "IPv4 range from which /24 management networks are taken "
            "(default 192.168.128.0/17)"),
    Setting("dns_domain", _dns_domain, "DNS domain of the management network (default ost.test)"),
    Setting("share", _bool, "with pytest-xdist: one environment for all workers (the first boots "
            "it, the last removes it) instead of one per worker", flag=True),
    Setting("reuse", _bool, "keep the VMs running after the session and reuse them in the next "
            "session if images, templates and settings are unchanged", flag=True),
    Setting("identity", _choice(IDENTITIES), "auto: each VM gets its own machine-id, SSH host key and "
            "hostname before any test sees it; keep: the guest is not changed (its first host key "
            "is pinned either way)"),
    Setting("cloud_init", _choice(CLOUD_INIT), "auto: a NoCloud seed for VMs whose layer has "
            "cloud-init (its package list says so); on: for every VM; off: never"),
    Setting("warm", _bool, "on/off: warm start, restore VMs from states saved by earlier sessions "
            "instead of booting them, and save new ones at the end of the session (default on)"),
    Setting("warm_dir", _absolute_path, "where warm start keeps its saved states (default <workdir>/warm); "
            "sessions of different work directories share them when they name the same"),
    Setting("warm_cache_size", _positive_int, "GiB the saved states may take, least recently used "
            "out (default 20)"),
    Setting("artifacts", _path, "after a failed run, save console logs, journals, /var/log, "
            "domain and network XML, DHCP leases and package lists here"),
    Setting("run_inside", str, "run this pytest invocation inside a fresh VM of this layer (e.g. "
            "host-installed) and report its tests as if they ran here"),
    Setting("inside_setup", _path, "with --ost-run-inside: a script run as root in the guest, in the "
            "tree, before the tests (install packages, build)"),
    Setting("inside_share", _choice(INSIDE_SHARES), "with --ost-run-inside: how the rootdir reaches "
            "the guest: virtiofs (shared read-only), copy, or auto (virtiofs, else copy)"),
    Setting("inside_artifacts", _guest_paths, "with --ost-run-inside and --ost-artifacts: guest files "
            "or folders to fetch after the run (comma-separated), besides the journal"),
    Setting("init_config", _path, "an OST init-config (e.g. basic-suite-master/ost.json): boot its networks "
            "and VMs at session start, run their deploy scripts, and set up OST's conventions "
            "(OST_DEPLOYMENT, the hosts inventory) so that OST's ost_utils fixtures find them"),
    Setting("suite", _suite, "OST suite name, as in domain and host names ost-<suite>-<vm> (default: "
            "the name of the init-config's directory)"),
    Setting("root", _path, "OST repository root: deploy-script paths are relative to it (default: "
            "pytest's rootdir)", env_name="OST_REPO_ROOT"),
    Setting("firmware", _choice(FIRMWARES), "bios, efi, or auto (the default): per image, from its partition "
            "table (GPT with an EFI System Partition and no BIOS boot code: efi)"),
    Setting("secure_boot", _bool, "UEFI guests boot with Secure Boot and Microsoft's keys enrolled (only "
            "signed loaders boot, e.g. shim); default off: the firmware boots signed and unsigned loaders"),
    Setting("deploy_timeout", _seconds, "seconds each deploy script of an OST init-config may run before "
            "it is stopped and reported as failed (default 1800)"),
    Setting("ip_version", _choice(IP_VERSIONS), "addresses on every network: 4, 6 or both (default both: "
            "IPv4 and an IPv6 ULA /64, each with DHCP reservations and DNS)"),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("ostimages", "VMs from installed ost-images (pytest-ostimages)")
    for setting in SETTINGS:
        help = f"{setting.help} [ini: {setting.ini}, env: {setting.env}]"
        if setting.flag:
            group.addoption(setting.option, action="store_const", const="true", default=None,
                            dest=setting.ini, help=help)
            parser.addini(setting.ini, help=setting.help, type="string", default=None)
        else:
            group.addoption(setting.option, action="store", default=None, dest=setting.ini,
                            metavar=setting.name.upper(), help=help)
            parser.addini(setting.ini, help=setting.help, type="string", default=None)


def resolve(
    option: Callable[[str], Optional[str]],
    ini: Callable[[str], Optional[str]],
    environ: Mapping[str, str],
) -> OstConfig:
    """Build the config from raw sources; raise pytest.UsageError for a bad value."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        for source, raw in (
            (setting.option, option(setting.ini)),
            (f"ini {setting.ini}", ini(setting.ini)),
            (f"${setting.env}", environ.get(setting.env)),
        ):
            if raw is not None:
                try:
                    values[setting.name] = setting.parse(raw)
                except ValueError as exc:
                    raise pytest.UsageError(f"{source}={raw!r}: {exc}") from None
                break
    if "libvirt_uri" in values:  # all of them; this session's is the first until it is placed
        values["hypervisors"] = values["libvirt_uri"]
        values["libvirt_uri"] = values["hypervisors"][0]
    values["given"] = frozenset(values)
    if "memory" in values and values["memory"].default == 0:
        values["memory"] = PerRole(OstConfig.memory.default, values["memory"].roles)
    if "vcpus" in values and values["vcpus"].default == 0:
        values["vcpus"] = PerRole(OstConfig.vcpus.default, values["vcpus"].roles)
    return OstConfig(**values)


def from_pytest(config: pytest.Config) -> OstConfig:
    return resolve(config.getoption, config.getini, os.environ)


def from_environment(overrides: Optional[Mapping[str, str]] = None) -> OstConfig:
    """Settings outside pytest (scripts, benchmarks): `overrides` (ini-style keys) > OST_*."""
    given = dict(overrides or {})
    return resolve(given.get, lambda _: None, os.environ)
