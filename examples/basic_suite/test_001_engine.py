def test_engine_up(engine):
    assert engine.ssh("systemctl is-system-running --wait").returncode == 0


def test_engine_has_its_layer(engine):
    assert engine.ssh("cat /etc/ost-layer").stdout.strip() == "engine-installed"
    # every package the layer added on top of base is installed (the list is read where the images
    # are: this machine, or a qemu+ssh:// hypervisor)
    added = engine.image.pkglist_diff.read_text().split()
    installed = engine.ssh("dpkg-query -W -f '${Package}-${Version}\\n'", check=True).stdout.split()
    assert added and set(added) <= set(installed)
