"""Step 1: find the installed ost-images.

ost-images ships each layer as an RPM ``ost-images-<distro>-<layer>`` with files
under ``/usr/share/ost-images/``::

    <distro>-<layer>.qcow2              the layer (upper layers are qcow2 overlays)
    <distro>_id_rsa, <distro>_id_rsa.pub  the root SSH key baked into the images
    <distro>-<layer>-pkglist.txt        packages in the layer
    <distro>-<layer>-pkglist-diff.txt   packages added on top of the parent layer

The RPM database is asked first (it also gives package names and versions and
notices files a package lists but that are missing); without RPMs the images
directory is scanned. Distro names have no hyphen, layer names may have some, so
file names are split at the first hyphen.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import ImageError
from ..hypervisor.host import LOCAL
from . import firmware

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host

PACKAGE_PREFIX = "ost-images-"


@dataclass(frozen=True)
class Package:
    name: str
    version: str


@dataclass(frozen=True)
class Image:
    """One installed layer with its resolved backing chain (top first)."""

    distro: str
    layer: str
    path: "AnyPath"  # on the hypervisor (hypervisor/host.py), as every path of the catalog
    chain: tuple["AnyPath", ...]
    chain_formats: tuple[str, ...]
    package: Optional[Package] = None
    pkglist: Optional["AnyPath"] = None
    pkglist_diff: Optional["AnyPath"] = None

    @property
    def label(self) -> str:
        return f"{self.distro}-{self.layer}"

    def has_package(self, name: str) -> bool:
        """Whether the layer's package list (``<name>-<version>`` lines) has `name`."""
        if self.pkglist is None or not self.pkglist.exists():
            return False
        return any(line.startswith(f"{name}-") and line[len(name) + 1:][:1].isdigit()
                   for line in self.pkglist.read_text().split())

    def identity(self) -> list[tuple[str, int, int]]:
        """File, size and mtime of every layer of the chain: changes when any layer does."""
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.chain]


@dataclass
class _Entry:
    """What the catalog knows about a layer before its chain is checked."""

    path: "AnyPath"
    package: Optional[Package] = None
    pkglist: Optional["AnyPath"] = None
    pkglist_diff: Optional["AnyPath"] = None


@dataclass
class Catalog:
    """The ost-images installed in one directory of a hypervisor (this machine, or one over SSH)."""

    directory: "AnyPath"
    source: str  # "rpm" or "directory": where the file list came from
    layers: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    keys: dict[str, "AnyPath"] = field(default_factory=dict)
    missing: dict["AnyPath", Package] = field(default_factory=dict)
    host: "Host" = field(default=LOCAL, repr=False)
    present: set[str] = field(default_factory=set, repr=False)  # the files found there (one listing: remote, each stat is a round trip)
    _resolved: dict[tuple[str, str], Image] = field(default_factory=dict, repr=False)
    _intact: set[str] = field(default_factory=set, repr=False)  # checked by qemu-img check
    _firmware: dict[str, str] = field(default_factory=dict, repr=False)  # read from the partition table

    # --- discovery ------------------------------------------------------------

    @classmethod
    def discover(cls, directory: Path, rpm: Sequence[str] = ("rpm",), host: "Host" = LOCAL) -> "Catalog":
        """The images of `directory` on `host`, from its RPM database when that has any."""
        where = host.path(directory)
        files = _rpm_files(rpm, where, host)
        if files:
            catalog = cls(where, "rpm", host=host, present=_listing(where))
            for path, package in files:
                if str(path) in catalog.present:
                    catalog._add(path, package)
                elif path.suffix == ".qcow2" or path.name.endswith("_id_rsa"):
                    catalog.missing[path] = package
            return catalog
        catalog = cls(where, "directory", host=host, present=_listing(where))
        for path in sorted(catalog.present):
            catalog._add(host.path(path), None)
        return catalog

    @property
    def where(self) -> str:
        """The images directory, for messages (on which hypervisor, when it is another machine)."""
        return str(self.directory) if self.host.local else f"{self.directory} on {self.host.name}"

    def exists(self, path: Optional["AnyPath"]) -> bool:
        """Whether `path` was there when the catalog looked (the images do not come and go in a session)."""
        return path is not None and str(path) in self.present

    def _add(self, path: "AnyPath", package: Optional[Package]) -> None:
        name = path.name
        if name.endswith("_id_rsa"):
            self.keys[name[: -len("_id_rsa")]] = path
            return
        distro, sep, rest = name.partition("-")
        if not sep or not distro:
            return
        if name.endswith(".qcow2"):
            entry = self.layers.setdefault((distro, rest[: -len(".qcow2")]), _Entry(path))
            entry.path, entry.package = path, package
        elif name.endswith("-pkglist-diff.txt"):
            self._entry(distro, rest[: -len("-pkglist-diff.txt")]).pkglist_diff = path
        elif name.endswith("-pkglist.txt"):
            self._entry(distro, rest[: -len("-pkglist.txt")]).pkglist = path

    def _entry(self, distro: str, layer: str) -> _Entry:
        default = self.directory / f"{distro}-{layer}.qcow2"
        return self.layers.setdefault((distro, layer), _Entry(default))

    # --- queries ----------------------------------------------------------------

    def distros(self) -> list[str]:
        return sorted({d for (d, _), e in self.layers.items() if self.exists(e.path)} | set(self.keys))

    def layer_names(self, distro: str) -> list[str]:
        return sorted(layer for (d, layer), e in self.layers.items() if d == distro and self.exists(e.path))

    def describe(self) -> str:
        """One line per distro, for error messages."""
        if not self.distros():
            return "  (none)"
        return "\n".join(f"  {d}: {', '.join(self.layer_names(d)) or '(no layers)'}" for d in self.distros())

    def choose_distro(self, requested: Optional[str], layers: Sequence[str] = ()) -> str:
        """`requested`, else the only distro that has every one of `layers` (all planned)."""
        distros = self.distros()
        if not distros:
            raise ImageError(self._nothing_installed())
        if requested is not None:
            if requested not in distros:
                raise ImageError(
                    f"Distro {requested!r} is not installed in {self.where}.\n"
                    f"Installed:\n{self.describe()}\n"
                    f"Choose one of them with --ost-distro, or install ost-images-{requested}-base."
                )
            return requested
        if len(distros) == 1:
            return distros[0]
        fitting = [d for d in distros if set(layers) <= set(self.layer_names(d))]
        if len(fitting) == 1 and layers:
            return fitting[0]
        needs = f" that has every layer this session uses ({', '.join(layers)})" if layers else ""
        found = (f"{len(fitting)} of them have all of those layers" if layers and fitting
                 else "none of them has all of those layers" if layers else "")
        raise ImageError(
            f"Several distros are installed in {self.where}{'; ' + found if found else ''}. "
            f"Choose the one{needs} with --ost-distro (ini ost_distro, env OST_DISTRO):\n"
            f"{self.describe()}"
        )

    def image(self, distro: str, layer: str) -> Image:
        """The layer with a validated backing chain, or an ImageError saying why not."""
        key = (distro, layer)
        if key in self._resolved:
            return self._resolved[key]
        wanted = self.directory / f"{distro}-{layer}.qcow2"
        if wanted in self.missing:
            package = self.missing[wanted]
            raise ImageError(
                f"Package {package.name}-{package.version} lists {wanted}, but the file is "
                f"missing. Reinstall it: dnf reinstall {package.name}"
            )
        entry = self.layers.get(key)
        if entry is None or not self.exists(entry.path):
            if distro not in self.distros():
                raise ImageError(self._nothing_installed() if not self.distros() else
                                 f"Distro {distro!r} is not installed in {self.where}.\n"
                                 f"Installed:\n{self.describe()}")
            raise ImageError(
                f"Layer {layer!r} of {distro} is not installed in {self.where}.\n"
                f"Installed layers of {distro}: {', '.join(self.layer_names(distro))}\n"
                f"Use one of them, or install ost-images-{distro}-{layer}."
            )
        image = Image(distro, layer, entry.path, *self._checked_chain(entry.path, entry.package),
                      entry.package, entry.pkglist, entry.pkglist_diff)
        self._resolved[key] = image
        return image

    def image_from_path(self, path: Path, distro: str) -> Image:
        """An image given as a path (``--ost-image=/some/file.qcow2``), on the hypervisor."""
        path = path.resolve() if self.host.local else self.host.path(path)
        if not path.is_file():
            raise ImageError(f"Image {path} does not exist. Give a layer name "
                             f"({', '.join(self.layer_names(distro)) or 'none installed'}) "
                             f"or the path of an existing qcow2 file.")
        stem = path.name[: -len(".qcow2")] if path.name.endswith(".qcow2") else path.stem
        file_distro, sep, layer = stem.partition("-")
        if sep and file_distro in self.distros():
            distro = file_distro
        else:
            layer = stem
        return Image(distro, layer, path, *self._checked_chain(path, None))

    def _checked_chain(self, path: "AnyPath", package: Optional[Package]) -> tuple[tuple["AnyPath", ...], tuple[str, ...]]:
        """The chain of `path`, each qcow2 in it checked for damage once per catalog."""
        chain, formats = backing_chain(path, package, self.host)
        for layer, fmt in zip(chain, formats):
            if fmt == "qcow2" and str(layer) not in self._intact:
                _check_intact(layer, path, package, self.host)
                self._intact.add(str(layer))
        return chain, formats

    def firmware(self, image: Image) -> str:
        """"bios" or "efi": what `image` boots with (images/firmware.py), read once per image."""
        if str(image.path) not in self._firmware:
            self._firmware[str(image.path)] = firmware.detect(image.path, self.host)
        return self._firmware[str(image.path)]

    def ssh_key(self, distro: str) -> "AnyPath":
        """The private root key of the distro's images."""
        expected = self.directory / f"{distro}_id_rsa"
        if expected in self.missing:
            package = self.missing[expected]
            raise ImageError(f"Package {package.name}-{package.version} lists {expected}, but the "
                             f"file is missing. Reinstall it: dnf reinstall {package.name}")
        key = self.keys.get(distro)
        if key is None:
            raise ImageError(
                f"No SSH key for {distro}: expected {expected} (shipped by "
                f"ost-images-{distro}-base). Install or reinstall that package."
            )
        return key

    def _nothing_installed(self) -> str:
        return (
            f"No ost-images are installed: the RPM database has no {PACKAGE_PREFIX}* package "
            f"with files in {self.where}, and the directory holds no <distro>-<layer>.qcow2.\n"
            f"Install some (e.g. dnf install ost-images-el9stream-engine-installed "
            f"ost-images-el9stream-host-installed) or point --ost-images-dir at your images."
        )


def _listing(directory: "AnyPath") -> set[str]:
    try:
        return {str(path) for path in directory.iterdir()}
    except OSError:  # not there (yet): nothing installed
        return set()


def backing_name(path: "AnyPath") -> Optional[str]:
    """The backing file a qcow2 image names in its header, None for a whole image (or no qcow2)."""
    try:
        with path.open("rb") as image:
            header = image.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset:
                return None
            image.seek(offset)
            return image.read(size).decode(errors="replace")
    except OSError:
        return None


def _rpm_files(rpm: Sequence[str], directory: "AnyPath", host: "Host") -> list[tuple["AnyPath", Package]]:
    """(file, package) of every ost-images-* package file inside `directory`, from `host`'s RPM database."""
    query = [*rpm, "-qa", "--qf", "[%{=NAME}\t%{=VERSION}-%{=RELEASE}\t%{FILENAMES}\n]",
             PACKAGE_PREFIX + "*"]
    try:
        out = host.run(query).text
    except FileNotFoundError:  # no rpm on this host: the directory scan is all we have
        return []
    found = []
    for line in out.splitlines():
        name, _, rest = line.partition("\t")
        version, _, filename = rest.partition("\t")
        path = host.path(filename) if filename else None
        if path is not None and str(path.parent) == str(directory):
            found.append((path, Package(name, version)))
    return found


def _owner_and_fix(path: "AnyPath", package: Optional[Package]) -> tuple[str, str]:
    """How error messages name the image's package, and what to do about a bad image."""
    owner = f" (package {package.name}-{package.version})" if package else ""
    fix = (f"Reinstall the packages of the chain, e.g. dnf reinstall {package.name} "
           f"ost-images-{path.name.partition('-')[0]}-base" if package
           else "Rebuild or replace the image and its backing files.")
    return owner, fix


def backing_chain(path: "AnyPath", package: Optional[Package],
                  host: "Host" = LOCAL) -> tuple[tuple["AnyPath", ...], tuple[str, ...]]:
    """Files and formats of the chain of `path` (top first), as qemu-img resolves it where it is."""
    owner, fix = _owner_and_fix(path, package)
    try:
        result = host.run(["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(path)])
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed; it is needed to check and overlay "
                         "images. Install qemu-img (RPM) or qemu-utils (Debian).") from None
    if result.returncode != 0:
        missing = re.search(r"Could not open '([^']+)': .*No such file or directory", result.stderr)
        if missing and missing.group(1) != str(path):
            problem = (f"is installed, but its backing chain is broken: its backing file "
                       f"{missing.group(1)} does not exist")
        else:
            problem = "cannot be used: qemu-img cannot open it (damaged, truncated or unreadable)"
        raise ImageError(f"Image {path}{owner} {problem}.\n  qemu-img: {result.stderr.strip()}\n  {fix}")
    infos = json.loads(result.stdout)
    if isinstance(infos, dict):  # a flat image
        infos = [infos]
    top = infos[0]
    if top.get("format") != "qcow2":
        raise ImageError(f"Image {path}{owner} is not a qcow2 image (qemu-img sees format "
                         f"{top.get('format')!r}). {fix}")
    # qemu-img names backing files as resolved, absolute (a relative name is relative to the layer)
    files = tuple(Path(info["filename"]).resolve() if host.local else host.path(info["filename"]) for info in infos)
    return files, tuple(str(info.get("format", "raw")) for info in infos)


def _check_intact(path: "AnyPath", top: "AnyPath", package: Optional[Package], host: "Host" = LOCAL) -> None:
    """A truncated or damaged qcow2 opens fine; qemu-img check reads its metadata (fast).

    `top` and `package` are the image whose chain `path` is in, for the message.
    """
    owner, fix = _owner_and_fix(top, package)
    result = host.run(["qemu-img", "check", "-U", "--output=json", str(path)])
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = {"check-errors": 1}
    damage = report.get("corruptions", 0) + report.get("check-errors", 0)
    if damage:  # leaks alone (exit status 3) waste space but harm nobody
        first = next(iter(result.stderr.strip().splitlines()), "")
        raise ImageError(f"Image {path}{owner} cannot be used: it is damaged or truncated "
                         f"(qemu-img check finds {damage} errors; first: {first})\n  {fix}")

