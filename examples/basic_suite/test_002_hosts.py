import hashlib


def test_hosts_up(hosts):
    assert len(hosts) == 2
    for host in hosts:
        assert host.ssh("systemctl is-system-running --wait").returncode == 0


def test_hosts_have_their_layer(host0, host1):
    for host in (host0, host1):
        assert host.ssh("cat /etc/ost-layer").stdout.strip() == "host-installed"


def test_hosts_see_engine(hosts, engine):
    for h in hosts:
        assert h.ssh(f"ping -c1 {engine.hostname}").returncode == 0


def test_engine_resolves_hosts(engine, hosts):
    for h in hosts:
        assert engine.ssh(f"getent ahostsv4 {h.hostname}").stdout.split()[0] == str(h.ip)


def test_copy_file_in_and_out(host0, tmp_path):
    config = tmp_path / "vdsm.conf"
    config.write_text("[vars]\nssl = true\n")
    host0.put(config, "/etc/vdsm.conf")
    assert host0.ssh("sha256sum /etc/vdsm.conf").stdout.split()[0] == \
        hashlib.sha256(config.read_bytes()).hexdigest()
    host0.get("/etc/ost-layer", tmp_path / "layer")
    assert (tmp_path / "layer").read_text() == "host-installed\n"
