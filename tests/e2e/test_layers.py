"""Custom layers: built from a script and a local package, cached, booted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pytest_ostimages import LayerFactory, VMFactory

from .helpers import DISTRO, IMAGES


def make_deb(folder: Path) -> Path:
    """A locally built package, as a developer would bring one."""
    root = folder / "ost-hello"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: ost-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.test>\n"
        "Description: test package\n")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "ost-hello"
    tool.write_text("#!/bin/sh\necho hello from a custom layer\n")
    tool.chmod(0o755)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(folder / "ost-hello_1.0_all.deb")],
                   check=True, capture_output=True)
    return folder / "ost-hello_1.0_all.deb"


def test_layer_is_built_once_and_boots(ost_layer_factory: LayerFactory, ost_vm_factory: VMFactory,
                                       tmp_path: Path) -> None:
    deb = make_deb(tmp_path)
    script = tmp_path / "provision.sh"
    script.write_text(f"set -e\ndpkg -i {deb.name}\necho hello-layer > /etc/ost-layer\n")
    layer = Path(ost_layer_factory("base", "hello", script=script, files=[deb]))
    try:
        built_at = layer.stat().st_mtime_ns
        # the same inputs: the cached layer, not a new build
        assert Path(ost_layer_factory("base", "hello", script=script, files=[deb])) == layer
        assert layer.stat().st_mtime_ns == built_at
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(layer)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["full-backing-filename"] == str(IMAGES / f"{DISTRO}-base.qcow2")

        vm = ost_vm_factory(str(layer), role="hello")
        assert vm.ssh("ost-hello").stdout == "hello from a custom layer\n"
        assert vm.ssh("dpkg -s ost-hello").returncode == 0
        assert vm.ssh("cat /etc/ost-layer").stdout == "hello-layer\n"
        ost_vm_factory.remove(vm)  # done with it
    finally:
        layer.unlink()
