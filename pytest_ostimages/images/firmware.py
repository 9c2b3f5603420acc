"""Which firmware an image boots with (BIOS or UEFI), read from its partition table.

ost-images built with kiwi (2026 and later) are UEFI only: a GPT with an EFI System
Partition and no BIOS boot code. The older ones, and the project's debian12 test
images, boot with BIOS from an MBR with boot code. The first sectors are read through
the image's whole backing chain with ``qemu-img dd`` (no libguestfs, no nbd):

- GPT with an EFI System Partition, no BIOS boot code in the MBR and no BIOS boot
  partition: UEFI;
- an MBR with an EFI System Partition (type 0xEF) and no boot code: UEFI;
- boot code in the MBR, or a BIOS boot partition (a hybrid image boots either way): BIOS;
- anything else (a blank disk, no partition table): not known, an error that says to
  choose with ``--ost-firmware``.
"""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING

from ..errors import ImageError
from ..hypervisor.host import LOCAL

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host

SECTOR = 512
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
MBR_ESP = 0xEF
MBR_PROTECTIVE = 0xEE
FIRMWARES = ("bios", "efi")


def detect(path: "AnyPath", host: "Host" = LOCAL) -> str:
    """"bios" or "efi" for the qcow2 image `path` on `host` (its chain included); ImageError if not known."""
    head = _sectors(host, path, 0, 34)  # the MBR, the GPT header and 32 sectors: 128 entries of 128 bytes
    boot_code = any(head[:440])
    if head[510:512] != b"\x55\xaa":
        raise _unknown(path, "it has no partition table (no MBR boot signature: a blank disk, or a bare filesystem)")
    mbr_types = [head[446 + 16 * i + 4] for i in range(4)]
    if head[SECTOR:SECTOR + 8] == b"EFI PART":
        entries_lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
        table = _sectors(host, path, entries_lba, -(-count * size // SECTOR)) if entries_lba != 2 or count * size > 32 * SECTOR \
            else head[2 * SECTOR:]
        types = {uuid.UUID(bytes_le=table[i * size:i * size + 16]) for i in range(count) if any(table[i * size:i * size + 16])}
        if BIOS_BOOT in types or boot_code:
            return "bios"
        if ESP in types:
            return "efi"
        raise _unknown(path, "its GPT has neither an EFI System Partition nor a BIOS boot partition, and its MBR "
                             "has no boot code")
    if boot_code:
        return "bios"
    if MBR_ESP in mbr_types:
        return "efi"
    raise _unknown(path, f"its MBR has no boot code and no EFI System Partition (partition types "
                         f"{', '.join(f'0x{t:02x}' for t in mbr_types if t) or 'none'})")


def _unknown(path: "AnyPath", why: str) -> ImageError:
    return ImageError(f"Cannot tell whether image {path} boots with BIOS or UEFI: {why}. If it boots at all, "
                      f"say which with --ost-firmware=bios or --ost-firmware=efi.")


def _sectors(host: "Host", path: "AnyPath", first: int, count: int) -> bytes:
    """`count` sectors from `first` of the image as the guest sees it, read where it is (qemu-img dd
    writes to a file: a temporary one there, then printed)."""
    script = ('out=$(mktemp) || exit 1; trap \'rm -f "$out"\' EXIT; qemu-img dd -U -f qcow2 -O raw '
              f'bs={SECTOR} skip={first} count={count} "if=$1" "of=$out" >&2 && cat "$out"')
    result = host.run(["sh", "-c", script, "sh", str(path)])
    if result.returncode != 0:
        raise ImageError(f"Cannot read the partition table of image {path}: {result.stderr.strip()}")
    return result.stdout
