"""libvirt's save image (``virsh save``), and the domain XML inside it, changed for another domain.

A warm start restores one saved state as many domains at once, each with its own
name, UUID, disks, network and console: libvirt refuses another UUID through its
API, so each restore gets a copy of the save image with its own domain XML.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import struct
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from lxml import etree

from ..errors import WarmStartError
from .host import LOCAL

if TYPE_CHECKING:
    from .host import AnyPath, Host

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("<16s19I")  # magic, version, data_len, was_running, format, cookieOffset, unused[14]


def changed_header(source: "AnyPath", edit: Callable[[etree._Element], None]) -> tuple[bytes, int]:
    """The start of libvirt save image `source` with its domain XML changed by `edit`, and where the
    saved memory stream begins in `source` (everything from there on stays as it is).

    Layout (libvirt's qemu_saveimage.h): a 92-byte header (magic, version, data_len,
    was_running, format, cookieOffset, 14 unused), then data_len bytes of data (the domain
    XML, NUL-terminated, then at cookieOffset the cookie), then the memory stream. The new
    start has the new XML, the cookie as it was, and a header that says how long they are.
    """
    with source.open("rb") as src:
        fields = list(HEADER.unpack(src.read(HEADER.size)))
        magic, version, data_len, cookie_offset = fields[0], fields[1], fields[2], fields[5]
        if magic != MAGIC or version != 2:
            raise WarmStartError(f"{source} is not a libvirt save image this plugin knows "
                                 f"(magic {magic!r}, version {version})")
        data = src.read(data_len)
    xml_end = cookie_offset or data_len
    root = etree.fromstring(data[:xml_end].split(b"\0", 1)[0], etree.XMLParser(remove_blank_text=True))
    edit(root)
    xml = etree.tostring(root, encoding="unicode").encode() + b"\0"
    cookie = data[xml_end:] if cookie_offset else b""
    fields[2] = len(xml) + len(cookie)
    fields[5] = len(xml) if cookie_offset else 0
    return HEADER.pack(*fields) + xml + cookie, HEADER.size + data_len


def patch_save_image(source: Path, target: Path, edit: Callable[[etree._Element], None]) -> None:
    """Copy libvirt save image `source` to `target` with its domain XML changed by `edit`."""
    start, stream = changed_header(source, edit)
    with open(source, "rb") as src, open(target, "wb") as out:
        out.write(start)
        src.seek(stream)
        shutil.copyfileobj(src, out, 16 << 20)  # the memory stream
    target.chmod(0o600)  # guest memory; libvirtd reads it as root


# the FIFO's feeder, where the state is: the new start (its stdin), then the saved stream as it is
FEED = 'exec >"$2"; cat; exec tail -c "+$3" "$1"'


@contextlib.contextmanager
def streamed(source: "AnyPath", fifo: "AnyPath", edit: Callable[[etree._Element], None],
             host: "Host" = LOCAL) -> Iterator["AnyPath"]:
    """A FIFO at `fifo` (on the hypervisor `host`, beside `source`) that gives, to the one reader
    that opens it (libvirt's restore), save image `source` with its domain XML changed by `edit`:
    the new start, then the saved memory stream from `source` itself. A restore under another
    name and UUID (libvirt refuses to change either for a save image) copies nothing to disk: the
    state is read once, as it is. The FIFO is gone when the block ends, read or not."""
    start, stream = changed_header(source, edit)
    fifo.unlink(missing_ok=True)  # a crashed session's
    host.mkfifo(fifo)
    feeder = host.spawn(["sh", "-c", FEED, "feed", str(source), str(fifo), str(stream + 1)], start)
    try:
        yield fifo
    finally:
        try:
            # the restore is over: the reader had all of it, or stopped early (the feeder's SIGPIPE)
            status = feeder.wait(2)
        except Exception:  # noqa: BLE001 - nobody opened it (the restore failed first): it would wait for ever
            feeder.kill()
            status = 0
        fifo.unlink(missing_ok=True)
    if status not in (0, 141, -13):  # 141/-13: SIGPIPE, the reader stopped (its own error says why)
        raise WarmStartError(f"could not read the saved state {source} (its feeder exited with {status})")


def restored_xml(fresh: etree._Element) -> Callable[[etree._Element], None]:
    """An edit that gives the saved domain XML the names and files of `fresh` (this session's):
    name, metadata, a new UUID, every disk's files (matched by target), every NIC's network and
    MAC (in order), the firmware's variables file and the console log."""

    def edit(root: etree._Element) -> None:
        for tag in ("name", "metadata"):
            _replace(root, root.find(tag), fresh.find(tag))
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        fresh_disks = fresh.findall("devices/disk")
        for index, disk in enumerate(root.findall("devices/disk")):
            target = disk.find("target")
            new_disk = fresh.find(f"devices/disk/target[@dev='{target.get('dev')}']/..") if target is not None else \
                (fresh_disks[index] if index < len(fresh_disks) else None)  # a saved XML without targets: in order
            if new_disk is not None:
                for tag in ("source", "backingStore"):
                    _replace(disk, disk.find(tag), new_disk.find(tag))
        for iface, new_iface in zip(root.findall("devices/interface"), fresh.findall("devices/interface")):
            for tag in ("source", "mac"):
                _replace(iface, iface.find(tag), new_iface.find(tag))
        nvram, new_nvram = root.find("os/nvram"), fresh.find("os/nvram")
        if nvram is not None and new_nvram is not None:
            nvram.text = new_nvram.text
        console_log = found(fresh, "devices/serial/source").get("path", "")
        for path in ("devices/serial/source", "devices/console/source"):
            node = root.find(path)
            if node is not None:
                node.set("path", console_log)

    return edit


def on_saved_disk(disk: etree._Element, overlay: Path, saved: Path) -> None:
    """Make `disk` (as rendered for a boot) the new `overlay` on the `saved` disk state."""
    found(disk, "source").set("file", str(overlay))
    chain = disk.find("backingStore")
    store = etree.Element("backingStore", type="file")
    etree.SubElement(store, "format", type="qcow2")
    # read-only and shared by every restore: libvirt must not relabel it
    etree.SubElement(etree.SubElement(store, "source", file=str(saved)), "seclabel", model="dac", relabel="no")
    if chain is not None:
        disk.replace(chain, store)
        store.append(chain)
    else:
        disk.append(store)


def found(root: etree._Element, path: str) -> etree._Element:
    node = root.find(path)
    if node is None:
        raise WarmStartError(f"the domain XML has no {path}")
    return node


def _replace(parent: Any, old: Any, new: Any) -> None:
    """`new` in place of `old` (or added, if the saved XML had none)."""
    if new is None:
        return
    if old is None:
        parent.append(copy.deepcopy(new))
    else:
        parent.replace(old, copy.deepcopy(new))
