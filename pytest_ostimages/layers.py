"""Custom layers: a qcow2 layer of your own on top of an installed one, built once.

A layer is built by booting its parent, copying files in (locally built packages,
say), running a provisioning script and shutting the guest down cleanly; the VM's
overlay then is the new layer. It is cached under ``<workdir>/layers/``, keyed by
the parent's chain (file, size, mtime of every layer) and the hashes of the script
and files, so the same inputs reuse it. Chains longer than `squash_above` are
flattened into one image.

    python -m pytest_ostimages.layers --parent engine-installed --name myapp \\
        --script provision.sh --file ./myapp-1.0.noarch.rpm
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .config import OstConfig, from_environment
from .errors import OstError
from .hypervisor.connection import libvirt_error, qemu_ids
from .hypervisor.host import LOCAL
from .guest.vm import VM
from .images.catalog import Image
from .lab.inputs import VMSpec
from .lab.lab import Lab
from .state.folders import own_folder, share_with_qemu
from .waiting import poll

if TYPE_CHECKING:
    from .hypervisor.host import AnyPath, Host

INBOX = "/root/ost-layer"  # where the files and the script land in the guest


@dataclass(frozen=True)
class LayerRecipe:
    """What makes a layer: its parent, a name, a script and files for the script."""

    parent: str  # a layer name of the chosen distro, or a qcow2 path
    name: str
    script: Optional[Path] = None
    files: Sequence[Path] = field(default_factory=tuple)
    squash_above: Optional[int] = None  # flatten when the chain gets longer than this


def _digest(recipe: LayerRecipe, parent: Image) -> str:
    h = hashlib.sha256()
    for layer, size, mtime in parent.identity():
        h.update(f"{layer}\0{size}\0{mtime}\0".encode())
    for path in [recipe.script] if recipe.script else []:
        h.update(b"script\0" + path.read_bytes())
    for path in recipe.files:
        h.update(f"file\0{path.name}\0".encode() + path.read_bytes())
    h.update(f"squash\0{recipe.squash_above}".encode())
    return h.hexdigest()[:16]


def build_layer(config: OstConfig, recipe: LayerRecipe,
                progress: Callable[[str], None] = lambda _: None) -> Path:
    """The layer's qcow2 file: from the cache, or built now (and cached)."""
    for path in [*([recipe.script] if recipe.script else []), *recipe.files]:
        if not path.is_file():
            raise OstError(f"Layer {recipe.name!r}: {path} does not exist or is not a file.")
    # booted, never restored: a warm start would put the cache's disk state into the layer's chain
    lab = Lab(replace(config, warm=False), progress)
    try:
        lab.inputs.choose_distro([recipe.parent])
        parent = lab.inputs.image(recipe.parent)
        cache = own_folder(lab.roots.layers, "custom layer cache", "--ost-workdir", lab.host)
        target = cache / f"{parent.distro}-{recipe.name}-{_digest(recipe, parent)}.qcow2"
        with lab.host.lock(f"layer-{target.name}"):  # two sessions build it once
            if target.exists():
                progress(f"layer {recipe.name}: cached {target}")
                return target
            start = time.monotonic()
            [vm] = lab.boot([VMSpec(f"build-{recipe.name}"[:40], recipe.parent)])
            vm.ssh(f"mkdir -p {INBOX}", check=True)
            for path in recipe.files:
                vm.put(path, f"{INBOX}/{path.name}")
            if recipe.script is not None:
                vm.put(recipe.script, f"{INBOX}/provision.sh")
                progress(f"layer {recipe.name}: running {recipe.script.name}")
                vm.ssh(f"cd {INBOX} && sh ./provision.sh", check=True, timeout=3600)
            # Forget what this one boot left that every VM of the layer must not share,
            # including the builder's own identity (identity.py): its hostname.
            vm.ssh(f"rm -rf {INBOX} /var/lib/dhcp/*.leases; truncate -s0 /etc/machine-id; "
                   f"echo localhost >/etc/hostname; sed -i '/# ost-identity$/d' /etc/hosts; sync",
                   check=True)
            _shut_down(vm)
            _store(vm.overlay, target, len(parent.chain) + 1, recipe.squash_above,
                   qemu_ids(lab.conn, lab.virt_type), lab.host)
            progress(f"layer {recipe.name}: built {target} in {time.monotonic() - start:.0f} s")
            return target
    except libvirt_error() as exc:
        raise OstError(f"Layer {recipe.name!r} could not be built: libvirt says {exc.get_error_message()!r}.") from None
    finally:
        lab.close()


def _shut_down(vm: VM, timeout: float = 300) -> None:
    vm.ssh("systemctl poweroff", timeout=30)
    if not poll(lambda: vm.state() in ("shut off", "gone (undefined)"), timeout, 0.5):
        raise OstError(vm.describe_failure(f"did not power off within {timeout:.0f} s"))


def _store(overlay: "AnyPath", target: "AnyPath", depth: int, squash_above: Optional[int],
           qemu: Optional[tuple[int, int]], host: "Host" = LOCAL) -> None:
    """Move (or flatten) the builder's overlay into the cache, read-only, readable by qemu's user only
    (it holds what the build put into the guest, and the builder's host keys)."""
    partial = target.with_suffix(".partial")
    if squash_above is not None and depth > squash_above:
        done = host.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(overlay), str(partial)])
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise OstError(f"Cannot flatten the layer into {target} (--squash-above {squash_above}): "
                           f"{done.stderr.strip() or f'qemu-img exited with {done.returncode}'}")
    else:
        overlay.replace(partial)  # still backed by the parent, by absolute path
    share_with_qemu(partial, qemu, host)
    partial.replace(target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_ostimages.layers",
                                     description="Build (or find in the cache) a custom layer. "
                                                 "Settings come from OST_* variables.")
    parser.add_argument("--parent", required=True, help="layer name (engine-installed) or qcow2 path")
    parser.add_argument("--name", required=True, help="name of the new layer")
    parser.add_argument("--script", type=Path, help="provisioning script, run as root in the guest")
    parser.add_argument("--file", type=Path, action="append", default=[], dest="files",
                        help=f"file copied to {INBOX}/ before the script runs (repeatable)")
    parser.add_argument("--squash-above", type=int, help="flatten chains longer than this")
    args = parser.parse_args(argv)
    config = from_environment()
    try:
        path = build_layer(config, LayerRecipe(args.parent, args.name, args.script, tuple(args.files),
                                               args.squash_above), lambda m: print(m, file=sys.stderr))
    except OstError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(shlex.quote(str(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
